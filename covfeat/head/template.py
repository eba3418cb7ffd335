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
template is made (each weight set to a marker value, saved, read back), not assumed, and
checked once, when it is made: the template written with other weights and loaded back by
Keras must compute, on a few rows, what covfeat's numpy head computes with those weights (its
largest difference is kept in the layout).  A template that fails this is not kept and the
run stops with one line: made again, it would fail again on this Keras.  A template that
fails its checksum or layout, or whose recorded settings differ from the run's (named in the
note), is made again, with a note on stderr.  The cache folder must be the user's alone
(``fsutil.private_dir``): a Keras file is code that predict and export run.
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
from covfeat.core.fsutil import AtomicDir, private_dir, remove_stale, user_cache
from covfeat.head.config import HeadConfig

WEIGHTS_ENTRY = "model.weights.h5"


LAYOUT = "layout.json"


TEMPLATE = "head.keras"


FORMAT = 2  # 2: the layout holds the template's settings and its check, both under its checksum


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


ENV = "COVFEAT_HEAD_CACHE"


CHECK_ROWS = 4  # rows of the check that head.keras computes what the numpy head computes


CHECK_ATOL = 1e-5  # on the probabilities: float32 sums in two orders, not a misplaced weight


def cache_root() -> Path:
    return user_cache(ENV, "heads")


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
    return fingerprint({k: layout[k] for k in ("what", "datasets", "shapes", "sha256", "checked")})


def _differing(made: dict, wanted: dict, prefix: str = "") -> str | None:
    """The first setting that differs between two ``what`` dicts, said in words, or None."""
    for k in sorted(set(made) | set(wanted)):
        a, b = made.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differing(a, b, f"{prefix}{k}.")
            if inner:
                return inner
        elif a != b:
            return f"{prefix}{k} is {a!r} in it, {b!r} in this run"
    return None


def write_keras(data: bytes, datasets: list[str], dest: str | Path, weights: list[np.ndarray]) -> None:
    """Write ``dest`` (a .keras file) as the template ``data`` with ``weights`` in its
    ``datasets``: the same config, a new save date."""
    import h5py

    with zipfile.ZipFile(io.BytesIO(data)) as src:
        buf = io.BytesIO(src.read(WEIGHTS_ENTRY))
        with h5py.File(buf, "r+") as h:
            for name, w in zip(datasets, weights):
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


class HeadTemplate:
    """A saved, untrained head and the dataset path of each of its weights (in the order of
    the Keras tail's ``get_weights()``: dense kernel, bias, batch-norm gamma, beta, moving
    mean, moving variance, softmax kernel, bias).  Held in memory once read: the file may
    go away while a run trains."""

    def __init__(self, folder: Path, what: dict):
        self.folder = folder
        self.data = (folder / TEMPLATE).read_bytes()
        layout = json.loads((folder / LAYOUT).read_text())
        if layout.get("sha256") != sha256_bytes(self.data) or layout.get("layout_sha256") != _layout_digest(layout):
            raise ValueError("checksum differs")
        differs = _differing(layout["what"], json.loads(json.dumps(what)))
        if differs:
            raise ValueError(f"made for other settings: {differs}")
        if not layout["checked"]["max_abs_diff"] <= CHECK_ATOL:
            raise ValueError("its check against the numpy head did not pass")
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
        if [np.shape(w) for w in weights] != self.shapes:
            raise ValueError(f"weights of shapes {[np.shape(w) for w in weights]}, the head has {self.shapes}")
        write_keras(self.data, self.datasets, dest, weights)


def head_template(feature_shape, cfg: HeadConfig) -> HeadTemplate:
    """The template of this head: from covfeat's user cache, or made now with Keras (in a
    temporary folder, with a note, when the cache cannot be written)."""
    key, what = template_key(feature_shape, cfg)
    folder = cache_root() / key
    try:
        private_dir(folder.parent, "head-template cache", ENV)  # before anything in it is read
    except OSError as exc:
        return _for_this_run(key, feature_shape, cfg, what, folder.parent, exc)
    remove_stale(folder.parent)  # templates of killed runs, half made
    if folder.is_dir():
        try:
            return HeadTemplate(folder, what)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            print(f"note: the head template {folder} is unusable ({exc}); making it again with Keras.",
                  file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    try:
        return HeadTemplate(_make(folder, feature_shape, cfg, what), what)
    except OSError as exc:
        return _for_this_run(key, feature_shape, cfg, what, folder.parent, exc)


def _for_this_run(key, feature_shape, cfg, what, parent: Path, exc: OSError) -> HeadTemplate:
    import tempfile

    print(f"note: cannot keep the head template in {parent} ({exc.strerror or exc}); made it for this "
          f"run only (set {ENV} to a writable folder).", file=sys.stderr, flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return HeadTemplate(_make(Path(tmp) / key, feature_shape, cfg, what), what)
    except OSError as again:
        raise RunError(f"cannot make the head's template, not even in a temporary folder: "
                       f"{again.strerror or again}") from None


def locate_weights(model, tail, init: list[np.ndarray], folder: Path) -> list[str]:
    """The dataset path of each of the tail's weights in the model's Keras file, found by Keras
    itself: each weight set to a marker value (its index + 1), saved, read back."""
    import h5py

    tail.set_weights([np.full(w.shape, k + 1, w.dtype) for k, w in enumerate(init)])
    model.save(folder / "markers.keras")
    found: dict[int, str] = {}
    with zipfile.ZipFile(folder / "markers.keras") as z, h5py.File(io.BytesIO(z.read(WEIGHTS_ENTRY)), "r") as h:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.size:
                vals = np.unique(obj[()])
                if len(vals) == 1 and 1 <= vals[0] <= len(init):
                    found[int(vals[0]) - 1] = name
        h.visititems(visit)
    (folder / "markers.keras").unlink()
    tail.set_weights(init)
    if sorted(found) != list(range(len(init))):
        raise RuntimeError(f"could not locate the head's weights in its Keras file ({sorted(found)})")
    return [found[k] for k in range(len(init))]


def check_template(data: bytes, datasets: list[str], feature_shape, init: list[np.ndarray], folder: Path) -> dict:
    """Write the template with other weights (every one distinct, variances positive), load it
    back with Keras, and compare its probabilities on :data:`CHECK_ROWS` random feature maps
    with covfeat's numpy head on the same weights: what a trained head.keras must compute.
    RunError when they differ beyond :data:`CHECK_ATOL`."""
    import keras

    from covfeat.head.model import NumpyHead, pooled_mean

    rng = np.random.default_rng(0)
    probe = [(np.abs(w) + rng.uniform(0.5, 1.5, w.shape) if k == 5 else w + rng.normal(0, 0.5, w.shape))
             .astype(np.float32) for k, w in enumerate(init)]
    write_keras(data, datasets, folder / "check.keras", probe)
    x = rng.standard_normal((CHECK_ROWS, *feature_shape)).astype(np.float32)
    got = keras.models.load_model(folder / "check.keras").predict(x, verbose=0)
    (folder / "check.keras").unlink()
    want = NumpyHead(probe).predict(pooled_mean(x))
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    if not diff <= CHECK_ATOL:
        raise RunError(f"the head template Keras {keras.__version__} made does not compute what covfeat's head "
                       f"computes (probabilities differ by up to {diff:.3g} on {CHECK_ROWS} rows), so it is not "
                       "used; run fit-head with --engine tf, which trains the Keras head itself.")
    return {"rows": CHECK_ROWS, "max_abs_diff": diff}


def _make(folder: Path, feature_shape, cfg: HeadConfig, what: dict) -> Path:
    """Build the head with Keras, save it untrained, find where each weight lies, and check
    that the file computes what the numpy head computes."""
    from covfeat.head.model import build_head

    model, tail = build_head(feature_shape, cfg)
    init = tail.get_weights()
    with AtomicDir(folder.parent, folder.name, taken="keep") as entry:
        tmp = entry.path
        tmp.chmod(0o700)
        datasets = locate_weights(model, tail, init, tmp)
        model.save(tmp / TEMPLATE)
        data = (tmp / TEMPLATE).read_bytes()
        checked = check_template(data, datasets, feature_shape, init, tmp)
        layout = {"what": what, "datasets": datasets, "shapes": [list(w.shape) for w in init],
                  "sha256": sha256_bytes(data), "checked": checked}
        layout["layout_sha256"] = _layout_digest(layout)
        (tmp / LAYOUT).write_text(json.dumps(layout, indent=2))
    return folder
