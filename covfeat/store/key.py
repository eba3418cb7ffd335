"""A cache's name: the hash of its resolved config and its data's content, and the format version."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from covfeat.core.fingerprint import fingerprint
from covfeat.trust.neardup import FINGERPRINT_VERSION

FORMAT_VERSION = 4  # 2: no split in the cache; 3: an index over immutable shard files; 4: near-duplicate
# fingerprints of 15 views and a 64 x 64 thumbnail (trust.neardup, FINGERPRINT_VERSION 2)


MANIFEST_FIELDS = ("path", "label", "patient_id", "source", "view", "sha256")


# The libraries whose version can change a feature value, each with the distributions that
# provide it (the first installed one counts).  Not in the cache key (that would orphan every
# cache made before it); recorded in every shard and index, compared at merge and reuse.
FEATURE_LIBRARIES = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
    "keras": ("keras",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"),
    "numpy": ("numpy",),
    "pillow": ("pillow", "Pillow"),
    "pydicom": ("pydicom",),
}


@functools.cache
def library_versions() -> dict[str, str | None]:
    """covfeat's version and those of :data:`FEATURE_LIBRARIES` (None: not installed), read from
    the installed metadata, importing none of them (TensorFlow takes seconds to import)."""
    from importlib.metadata import PackageNotFoundError, version

    from covfeat.core import __version__

    out: dict[str, str | None] = {"covfeat": __version__}
    for name, dists in FEATURE_LIBRARIES.items():
        out[name] = None
        for d in dists:
            try:
                out[name] = version(d)
                break
            except PackageNotFoundError:
                continue
    return out


def version_difference(a: dict, b: dict) -> str:
    """The libraries whose versions differ, as ``name a -> b`` ('unrecorded' where one has none)."""
    names = sorted(set(a) | set(b))
    return ", ".join(f"{k} {a.get(k, 'unrecorded')} vs {b.get(k, 'unrecorded')}"
                     for k in names if a.get(k, "unrecorded") != b.get(k, "unrecorded"))


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
