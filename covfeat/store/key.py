"""A cache's name: the hash of its resolved config and its data's content, and the format version."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import h5py
import numpy as np

from covfeat.core.fingerprint import fingerprint
from covfeat.trust.neardup import FINGERPRINT_VERSION

FORMAT_VERSION = 4  # 2: no split in the cache; 3: an index over immutable shard files; 4: near-duplicate
# fingerprints of 15 views and a 64 x 64 thumbnail (trust.neardup, FINGERPRINT_VERSION 2)


MANIFEST_FIELDS = ("path", "label", "patient_id", "source", "view", "sha256")


def library_versions() -> dict[str, str]:
    import cv2
    import keras
    import tensorflow as tf

    from covfeat.core import __version__

    return {
        "covfeat": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__, "h5py": h5py.__version__, "opencv": cv2.__version__,
    }


def cache_key(config: dict, manifest_rows: list[dict]) -> str:
    """Short hash of the full resolved config (defaults included) and the data's content."""
    return fingerprint({"format": FORMAT_VERSION, "config": config, "data": manifest_rows,
                        "near_duplicate_fingerprint": FINGERPRINT_VERSION}, length=16)


def cache_name(backbone: str, weights_kind: str, key: str) -> str:
    return f"{backbone}-{weights_kind}-{key}.h5"


_NAMED_KEY = re.compile(r"-([0-9a-f]{16})\.h5$")


def key_in_name(path) -> str | None:
    """The key a cache file's name claims (the one :func:`cache_name` put there), or None for
    a name covfeat did not give."""
    m = _NAMED_KEY.search(Path(path).name)
    return m[1] if m else None
