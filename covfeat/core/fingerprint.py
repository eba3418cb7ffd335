"""What enters a fingerprint besides covfeat's own settings: Keras's and TensorFlow's versions and settings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def _versions() -> dict:
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


def _keras_settings() -> dict:
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
