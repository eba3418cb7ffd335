"""One fingerprint for every cache covfeat keeps, and what enters one besides covfeat's own
settings: Keras's and TensorFlow's versions and settings.

A fingerprint is the SHA-256 of an object's canonical JSON, then of the bytes of any source
files it depends on (Hugging Face datasets' ``fingerprint.py`` does the same for its
transforms).  It names the feature cache (``covfeat.store.key.cache_key``), the backbone
graph cache (``graph_key``), the head template (``template_key``) and a reproduction's head
runs (``_fit_tag``), so that all of them hash the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from covfeat.core.fsutil import sha256_file


def canonical_json(obj) -> str:
    """Keys sorted, no NaN or infinity (they have no JSON spelling), and json.dumps's own
    separators: the form the feature caches' names were first made with, kept so that they
    keep their names."""
    return json.dumps(obj, sort_keys=True, allow_nan=False)


def fingerprint(obj, files=(), length: int | None = None) -> str:
    """SHA-256 (hex, cut to ``length``) of ``obj``'s canonical JSON followed by the SHA-256 of
    each of ``files``' bytes, in order.

    Raises
    ------
    ValueError, TypeError
        ``obj`` holds a NaN or infinity, or a value JSON cannot spell.
    """
    d = hashlib.sha256(canonical_json(obj).encode())
    for f in files:
        d.update(b"\nfile:" + sha256_file(f).encode())
    return d.hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keras_versions() -> dict:
    """Keras's and TensorFlow's versions, read from their metadata (importing neither)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, dists in (("keras", ("keras",)), ("tensorflow", ("tensorflow", "tensorflow-cpu", "tf-nightly"))):
        for d in dists:
            try:
                out[key] = version(d)
                break
            except PackageNotFoundError:
                continue
        else:
            out[key] = None
    return out


KERAS_DEFAULTS = {"backend": "tensorflow", "floatx": "float32", "epsilon": 1e-07, "image_data_format": "channels_last"}


def keras_settings() -> dict:
    """The Keras settings that could change a built model, as Keras would resolve them (its
    keras.json, which Keras writes with the defaults on first import, then KERAS_BACKEND),
    read without importing Keras."""
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    try:
        conf = json.loads((Path(home) / "keras.json").read_text())
    except (OSError, ValueError):
        conf = {}
    out = {k: conf.get(k, v) if isinstance(conf, dict) else v for k, v in KERAS_DEFAULTS.items()}
    if os.environ.get("KERAS_BACKEND"):
        out["backend"] = os.environ["KERAS_BACKEND"]
    return out
