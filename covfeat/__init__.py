"""covfeat: transfer-learning COVID-19 vs NORMAL chest-radiograph classifiers on a cached feature store.

The two stages and the store between them, one package each, imports running downward only
(``tests/test_layout.py`` holds it so; ``ARCHITECTURE.md`` follows one image through them):

* :mod:`covfeat.core` -- errors, settings, fingerprints, file safety: what every stage uses;
* :mod:`covfeat.trust` -- metrics and their intervals, near-duplicates, the paper's numbers;
* :mod:`covfeat.store` -- the feature cache: shards, index, reader, catalog, lock;
* :mod:`covfeat.extraction` -- stage one: sources, decoding, backbones, shard drivers;
* :mod:`covfeat.head` -- stage two: split, SMOTE, the head, its kernels, fit and CV, run folders;
* :mod:`covfeat.probes` -- the shortcut audit's probes, which run both stages again;
* :mod:`covfeat.use` -- report, predict, export, explain, reproduce;
* :mod:`covfeat.cli` -- the command line.

The names below are the library's front door, loaded on first use (``import covfeat`` stays
cheap, and imports no TensorFlow).
"""

from importlib import import_module

from covfeat.core import __version__

_API = {
    "ExtractConfig": "covfeat.extraction.config", "DriverConfig": "covfeat.extraction.config",
    "FitConfig": "covfeat.head.config", "HeadConfig": "covfeat.head.config", "SplitConfig": "covfeat.head.config",
    "fit_config": "covfeat.head.config",
    "extract": "covfeat.extraction.run", "sample_sources": "covfeat.extraction.plan",
    "fit_head": "covfeat.head.fit", "Run": "covfeat.head.runs", "open_cache": "covfeat.store.reader",
    "audit": "covfeat.probes.audit", "report": "covfeat.use.report", "predict": "covfeat.use.predict",
    "Predictor": "covfeat.use.predict", "export": "covfeat.use.predict", "explain": "covfeat.use.explain",
    "reproduce": "covfeat.use.reproduce", "select": "covfeat.use.select",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'covfeat' has no attribute {name!r}")
