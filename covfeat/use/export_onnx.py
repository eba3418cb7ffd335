"""``covfeat export --format onnx``: the run's pixels function through tf2onnx, standard opset only.

The file takes ``pixels`` only: ONNX's ``ImageDecoder`` op is not implemented by onnxruntime,
so decoding image bytes in the graph would need a custom-op library on every server; the
client decodes as ``serving.json`` states.  The file is written under a temporary name,
loaded once with onnxruntime (when installed) and compared with the TF function on a random
batch; only a file that agrees takes ``--out``, so a converter that mistranslates an op never
leaves a file behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError
from covfeat.core.fsutil import atomic_file
from covfeat.imaging.decode import INPUT_SIZE

INSTALL = "pip install 'covfeat[onnx]'"
TOLERANCE = 1e-4  # of p_covid and p_covid_raw between onnxruntime and the TF function


def require_onnx() -> None:
    """Refuse --format onnx without its packages, before any work."""
    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs the onnx and tf2onnx packages ({exc.name} is missing): {INSTALL}.")


def versions() -> dict:
    import onnx
    import tensorflow as tf
    import tf2onnx

    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__}


def check_agrees(fn, path: Path) -> str | None:
    """Why the ONNX file at ``path`` disagrees with ``fn`` on a random batch; None when it agrees
    (or onnxruntime is not installed, which ``serving.json`` then says)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = np.random.default_rng(0).uniform(0, 255, (2, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)
    want = {k: np.asarray(v) for k, v in fn(x).items()}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixels": x})))
    if set(got) != set(want):
        return f"its outputs are {sorted(got)}, not {sorted(want)}"
    for k in ("p_covid", "p_covid_raw"):
        d = float(np.abs(got[k] - want[k]).max())
        if not d <= TOLERANCE:
            return f"its {k} differs from TensorFlow's by {d:.2e} (> {TOLERANCE:g})"
    sure = np.abs(want["p_covid_raw"].astype(np.float64) - want["threshold"]) > TOLERANCE
    if (got["covid"][sure] != want["covid"][sure]).any():
        return "its labels differ from TensorFlow's"
    return None


def write_onnx(fn, out: Path, backbone: str) -> dict:
    """Convert ``fn`` (pixels -> outputs) to ``out``; what serving.json says of the conversion.

    Raises
    ------
    ConfigError
        tf2onnx failed on this backbone or TensorFlow, the graph needs a non-standard op, or
        onnxruntime disagrees with TensorFlow; nothing is left at ``out``.
    """
    import tensorflow as tf
    import tf2onnx

    v = versions()
    said = f"backbone {backbone}, tensorflow {v['tensorflow']}, tf2onnx {v['tf2onnx']}, onnx {v['onnx']}"
    spec = tf.TensorSpec((None, INPUT_SIZE, INPUT_SIZE, 3), tf.float32, name="pixels")
    tf_fn = tf.function(fn)
    with atomic_file(out) as tmp:
        try:
            model, _ = tf2onnx.convert.from_function(tf_fn, input_signature=[spec], output_path=str(tmp))
        except Exception as exc:  # any converter failure is the converter's, for this backbone and these versions
            raise ConfigError(f"export: tf2onnx could not convert this model ({said}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if custom:
            raise ConfigError(f"export: tf2onnx needed non-standard ops ({', '.join(custom)}) for this model ({said}); "
                              "no ONNX file was written.")
        why = check_agrees(tf_fn, tmp)
        if why:
            raise ConfigError(f"export: the converted ONNX model disagrees with TensorFlow ({said}): {why}; no ONNX "
                              "file was written.")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    try:
        import onnxruntime

        checked = f"onnxruntime {onnxruntime.__version__}: agreed with TensorFlow within {TOLERANCE:g} at export"
    except ImportError:
        checked = "not checked at export: onnxruntime was not installed"
    return {"onnx": {"opset": opset, "checked": checked, **v}}
