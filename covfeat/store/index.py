"""The index over a cache's shards: a virtual dataset of their features, the manifest and the
attributes (its own key among them), written once every shard is present and verified, marked
complete last, as an atomic file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from covfeat.core.errors import CacheError
from covfeat.core.fsutil import atomic_file
from covfeat.store.key import FORMAT_VERSION, MANIFEST_FIELDS, library_versions
from covfeat.store.shards import ShardSpec, ShardStore, string_dataset


def assemble(target: Path, store: ShardStore, specs: list[ShardSpec], *, config: dict, manifest: list[dict],
             feature_shape: tuple, dtype: str, extra: dict, verified: bool = False) -> None:
    """Write the index: ``features`` a virtual dataset over every shard (no feature is copied),
    the small per-sample and per-image arrays, the manifest, the skip list and the attributes;
    under a temporary name, verified, marked complete last, renamed.  Every shard must be
    present and verified first, or the index is not written and the error names the shard."""
    missing = store.missing(specs)
    if missing:
        raise CacheError(f"{len(missing)} of {len(specs)} shards are missing (first: {store.path(missing[0])}); "
                         "run the extraction again to compute them.")
    row_of = {}
    if not verified:
        for spec in specs:
            store.verify(spec, manifest)
    n = 0
    parts = []
    for spec in specs:
        with h5py.File(store.path(spec), "r") as h:
            k = h["features"].shape[0]
            parts.append((spec, k, h["image"][:], h["view"][:], h["aug_params"][:], h["skipped"][:],
                          h["phash"][:], h["thumb"][:]))
            n += k
    for spec in specs:
        for pos, r in enumerate(spec.rows):
            row_of[(spec.index, pos)] = r
    labels_m = np.array([int(r["label"]) for r in manifest], dtype=np.int8)
    from covfeat.trust.neardup import FINGERPRINT_HASHES, FINGERPRINT_THUMB_SHAPE

    hashes = np.zeros((len(manifest), FINGERPRINT_HASHES), np.uint64)
    thumbs = np.zeros((len(manifest), *FINGERPRINT_THUMB_SHAPE), np.uint8)
    skipped: dict[int, str] = {}
    rows = np.empty(n, np.int32)
    views = np.empty(n, np.int8)
    params = np.empty((n, 4), np.float32)
    layout = h5py.VirtualLayout(shape=(n, *feature_shape), dtype=dtype)
    i = 0
    for spec, k, image, view, aug, skip, ph, th in parts:
        rows[i:i + k] = [spec.rows[j] for j in image]
        views[i:i + k] = view
        params[i:i + k] = aug
        if k:
            rel = os.path.relpath(store.path(spec), target.parent)
            layout[i:i + k] = h5py.VirtualSource(rel, "features", shape=(k, *feature_shape))
        for pos, r in enumerate(spec.rows):
            reason = skip[pos].decode() if isinstance(skip[pos], bytes) else str(skip[pos])
            if reason:
                skipped[r] = reason
            hashes[r], thumbs[r] = ph[pos], th[pos]
        i += k
    with atomic_file(target) as tmp, h5py.File(tmp, "w") as h:
        h.create_virtual_dataset("features", layout, fillvalue=np.nan)
        h.create_dataset("row", data=rows, chunks=True, fletcher32=True)
        h.create_dataset("view", data=views, chunks=True, fletcher32=True)
        h.create_dataset("aug_params", data=params, chunks=True, fletcher32=True)
        h.create_dataset("label", data=labels_m[rows], chunks=True, fletcher32=True)
        g = h.create_group("manifest")
        for f in MANIFEST_FIELDS:
            string_dataset(g, f, [r[f] for r in manifest])
        g.create_dataset("phash", data=hashes, chunks=True, fletcher32=True)
        g.create_dataset("thumb", data=thumbs, chunks=(min(len(manifest), 256), *thumbs.shape[1:]), fletcher32=True)
        sk = h.create_group("skipped")
        string_dataset(sk, "path", [manifest[k]["path"] for k in sorted(skipped)])
        string_dataset(sk, "reason", [skipped[k] for k in sorted(skipped)])
        h.attrs["config"] = json.dumps(config, sort_keys=True)
        h.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)
        h.attrs["format_version"] = FORMAT_VERSION
        h.attrs["key"] = store.key  # checked against the file's name on open: a copy under another name is refused
        h.attrs["shards"] = json.dumps([[os.path.relpath(store.path(s), target.parent), s.index] for s in specs])
        for k, v in extra.items():
            h.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        h.attrs["digest"] = index_digest(h)  # what Fletcher-32 cannot cover: attributes and strings
        h.flush()
        h.attrs["complete"] = True  # last: even the temporary file is marked complete only when whole


def index_digest(h: h5py.File) -> str:
    """SHA-256 of the attributes (config, versions, skip lists...) and the string datasets."""
    d = hashlib.sha256()
    for k in sorted(h.attrs):
        if k not in ("digest", "complete"):
            d.update(k.encode() + b"=" + str(h.attrs[k]).encode() + b"\n")
    for grp in ("manifest", "skipped"):
        for k in sorted(h[grp]):
            ds = h[grp][k]
            if ds.dtype.kind == "O":
                d.update(f"{grp}/{k}:".encode() + b"\x00".join(v if isinstance(v, bytes) else str(v).encode()
                                                                 for v in ds[:]))
    return d.hexdigest()


REBUILD = "run the same `covfeat extract` with --rebuild to move it aside and extract again"


def damaged(path: Path, what: str) -> CacheError:
    return CacheError(f"{path} is damaged ({what}); {REBUILD}.")
