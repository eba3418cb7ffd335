"""The head's initial weights and its Keras file, without importing TensorFlow on the fast path.

From Keras, fit-head's numba engine needs two things only: the head's initial weights
(Keras's own initialisers, seeded with the run's seed) and ``head.keras``, the file that
predict, export, explain and the audit load.  Importing TensorFlow and Keras for them
costs about 5 s, more than the 100 epochs.  Both are a pure function of the head's
architecture and seed and of the Keras and TensorFlow versions, so the first run with a
given head builds it with Keras and keeps the saved, untrained model as a *template* in
covfeat's user cache (``$COVFEAT_HEAD_CACHE``, else ``$XDG_CACHE_HOME/covfeat/heads``,
else ``~/.cache/covfeat/heads``).  Later runs read the initial weights from the template
and write ``head.keras`` as the template with the trained weights in place of the initial
ones: the same ``config.json``, the same weights layout, a new save date.

Which dataset of the template holds which weight is found by Keras itself when the
template is made (each weight set to a marker value, saved, read back), not assumed.  A
template that fails its checksum or layout is made again, with a note on stderr.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np

from covfeat.core.errors import RunError
from covfeat.core.fingerprint import fingerprint, keras_settings, keras_versions, sha256_bytes
from covfeat.core.fsutil import AtomicDir, user_cache
from covfeat.head.config import HeadConfig

WEIGHTS_ENTRY = "model.weights.h5"


LAYOUT = "layout.json"


TEMPLATE = "head.keras"


FORMAT = 1


# The HeadConfig fields that cannot change the untrained head or its Keras file, with the
# reason; every other field enters the template's key, so a new one can never reuse a stale
# template (tests/test_headfile.py derives the check from the dataclass).
NOT_IN_TEMPLATE = {
    "epochs": "how long the head trains, not what it starts as",
    "batch_size": "how the rows are fed to training",
    "learning_rate": "the optimiser's; the template is saved uncompiled, without an optimiser",
    "momentum": "the optimiser's, as learning_rate",
    "balance": "which rows train it (SMOTE, class weights), not its layers",
    "smote_k": "SMOTE's neighbours, as balance",
    "engine": "which implementation trains it; both start from the same Keras head (tests/test_headfile.py)",
}


def cache_root() -> Path:
    return user_cache("COVFEAT_HEAD_CACHE", "heads")


def template_key(feature_shape, cfg: HeadConfig) -> tuple[str, dict]:
    """What the untrained head depends on, and its hash: every setting but those of
    :data:`NOT_IN_TEMPLATE` (the dropout rate, the dense layer's width, the activity
    regularisers, the seed of its initialisers), the feature shape, the Keras and TensorFlow
    versions and settings, and the bytes of covfeat's head definition (layers, names,
    batch-norm constants), so that a changed ``build_head`` never reuses a template."""
    if cfg.dropout is None:
        raise ValueError("the head template needs a resolved dropout rate (HeadConfig.resolved(backbone)).")
    what = {"format": FORMAT, "feature_shape": [int(x) for x in feature_shape],
            "head": {f.name: getattr(cfg, f.name) for f in fields(HeadConfig) if f.name not in NOT_IN_TEMPLATE},
            "keras_settings": keras_settings(), **keras_versions()}
    return fingerprint(what, files=[Path(__file__).parent / "model.py"], length=20), what


def _layout_digest(layout: dict) -> str:
    return fingerprint({k: layout[k] for k in ("datasets", "shapes", "sha256")})


class HeadTemplate:
    """A saved, untrained head and the dataset path of each of its weights (in the order of
    the Keras tail's ``get_weights()``: dense kernel, bias, batch-norm gamma, beta, moving
    mean, moving variance, softmax kernel, bias).  Held in memory once read: the file may
    go away while a run trains."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = (folder / TEMPLATE).read_bytes()
        layout = json.loads((folder / LAYOUT).read_text())
        if layout.get("sha256") != sha256_bytes(self.data) or layout.get("layout_sha256") != _layout_digest(layout):
            raise ValueError("checksum differs")
        self.datasets = layout["datasets"]
        self.shapes = [tuple(s) for s in layout["shapes"]]
        self._initial = self._read()
        if [w.shape for w in self._initial] != self.shapes:
            raise ValueError("weights layout differs")

    def _read(self) -> list[np.ndarray]:
        import h5py

        with zipfile.ZipFile(io.BytesIO(self.data)) as z, h5py.File(io.BytesIO(z.read(WEIGHTS_ENTRY)), "r") as h:
            return [np.array(h[name], np.float32) for name in self.datasets]

    def initial_weights(self) -> list[np.ndarray]:
        return [w.copy() for w in self._initial]

    def save(self, dest: str | Path, weights: list[np.ndarray]) -> None:
        """Write ``dest`` (a .keras file) as the template holding ``weights``."""
        import h5py

        if [np.shape(w) for w in weights] != self.shapes:
            raise ValueError(f"weights of shapes {[np.shape(w) for w in weights]}, the head has {self.shapes}")
        with zipfile.ZipFile(io.BytesIO(self.data)) as src:
            buf = io.BytesIO(src.read(WEIGHTS_ENTRY))
            with h5py.File(buf, "r+") as h:
                for name, w in zip(self.datasets, weights):
                    h[name][...] = np.asarray(w, h[name].dtype)
            with zipfile.ZipFile(dest, "w") as out:
                for info in src.infolist():
                    data = src.read(info)
                    if info.filename == WEIGHTS_ENTRY:
                        data = buf.getvalue()
                    elif info.filename == "metadata.json":
                        meta = json.loads(data)
                        meta["date_saved"] = time.strftime("%Y-%m-%d@%H:%M:%S")
                        data = json.dumps(meta).encode()
                    out.writestr(zipfile.ZipInfo(info.filename, date_time=time.localtime()[:6]), data,
                                 compress_type=info.compress_type)


def head_template(feature_shape, cfg: HeadConfig) -> HeadTemplate:
    """The template of this head: from covfeat's user cache, or made now with Keras (in a
    temporary folder, with a note, when the cache cannot be written)."""
    import tempfile

    key, what = template_key(feature_shape, cfg)
    folder = cache_root() / key
    if folder.is_dir():
        try:
            return HeadTemplate(folder)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            print(f"note: the head template {folder} is unusable ({exc}); making it again with Keras.",
                  file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    try:
        return HeadTemplate(_make(folder, feature_shape, cfg, what))
    except OSError as exc:
        print(f"note: cannot keep the head template in {folder.parent} ({exc.strerror or exc}); made it for this "
              "run only (set COVFEAT_HEAD_CACHE to a writable folder).", file=sys.stderr, flush=True)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return HeadTemplate(_make(Path(tmp) / key, feature_shape, cfg, what))
        except OSError as again:
            raise RunError(f"cannot make the head's template, not even in a temporary folder: "
                           f"{again.strerror or again}") from None


def _make(folder: Path, feature_shape, cfg: HeadConfig, what: dict) -> Path:
    """Build the head with Keras, save it untrained, and find where each weight lies."""
    import h5py

    from covfeat.head.model import build_head

    model, tail = build_head(feature_shape, cfg)
    init = tail.get_weights()
    with AtomicDir(folder.parent, folder.name, taken="keep") as entry:
        tmp = entry.path
        tail.set_weights([np.full(w.shape, k + 1, w.dtype) for k, w in enumerate(init)])
        model.save(tmp / "markers.keras")
        found: dict[int, str] = {}
        with zipfile.ZipFile(tmp / "markers.keras") as z, h5py.File(io.BytesIO(z.read(WEIGHTS_ENTRY)), "r") as h:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and obj.size:
                    vals = np.unique(obj[()])
                    if len(vals) == 1 and 1 <= vals[0] <= len(init):
                        found[int(vals[0]) - 1] = name
            h.visititems(visit)
        if sorted(found) != list(range(len(init))):
            raise RuntimeError(f"could not locate the head's weights in its Keras file ({sorted(found)})")
        (tmp / "markers.keras").unlink()
        tail.set_weights(init)
        model.save(tmp / TEMPLATE)
        layout = {"what": what, "datasets": [found[k] for k in range(len(init))],
                  "shapes": [list(w.shape) for w in init], "sha256": sha256_bytes((tmp / TEMPLATE).read_bytes())}
        layout["layout_sha256"] = _layout_digest(layout)
        (tmp / LAYOUT).write_text(json.dumps(layout, indent=2))
    return folder
