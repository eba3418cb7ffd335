"""The index over a cache's shards: the record of every shard it is made of, a virtual dataset
of their features (for readers other than covfeat), the manifest and the attributes (its own
key among them), written once every shard is present and verified, marked complete last, as an
atomic file.

The shard table (group ``shard_table``) binds each shard to the index: its file name relative
to the index's real folder, its first sample and sample count in the index's sample order, its
manifest rows, and the SHA-256 of its features and its digest.  covfeat reads features shard by
shard through this table, never through the virtual dataset, so neither ``HDF5_VDS_PREFIX`` nor
a symlinked index can send a read to files other than the ones checked."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import h5py
import numpy as np

from covfeat.core.errors import CacheError
from covfeat.core.fsutil import atomic_file
from covfeat.store.key import FORMAT_VERSION, MANIFEST_FIELDS
from covfeat.store.shards import ShardSpec, ShardStore, common_versions, string_dataset

TABLE = "shard_table"


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
    versions = common_versions(store, specs)  # shards of different library versions are never merged
    if not verified:
        for spec in specs:
            store.verify(spec, manifest, versions)
    n = 0
    parts = []
    table = {"name": [], "start": [], "samples": [], "images": [], "bytes": [], "features_sha256": [], "digest": []}
    for spec in specs:
        with h5py.File(store.path(spec), "r") as h:
            k = h["features"].shape[0]
            parts.append((spec, k, h["image"][:], h["view"][:], h["aug_params"][:], h["skipped"][:],
                          h["phash"][:], h["thumb"][:]))
            for f, v in (("name", os.path.relpath(store.path(spec), target.parent)), ("start", n), ("samples", k),
                         ("images", len(spec.rows)), ("bytes", store.path(spec).stat().st_size),
                         ("features_sha256", h.attrs["features_sha256"]),
                         ("digest", h.attrs["digest"])):
                table[f].append(v)
            n += k
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
        t = h.create_group(TABLE)
        for f in ("name", "features_sha256", "digest"):
            string_dataset(t, f, table[f])
        for f in ("start", "samples", "images", "bytes"):
            t.create_dataset(f, data=np.asarray(table[f], np.int64))
        t.create_dataset("members", data=np.asarray([r for s in specs for r in s.rows], np.int64))
        h.attrs["config"] = json.dumps(config, sort_keys=True)
        h.attrs["versions"] = json.dumps(versions, sort_keys=True)
        h.attrs["format_version"] = FORMAT_VERSION
        h.attrs["key"] = store.key  # checked against the file's name on open: a copy under another name is refused
        h.attrs["shards"] = json.dumps([[os.path.relpath(store.path(s), target.parent), s.index] for s in specs])
        for k, v in extra.items():
            h.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        h.attrs["digest"] = index_digest(h)  # what Fletcher-32 cannot cover: attributes and strings
        h.flush()
        h.attrs["complete"] = True  # last: even the temporary file is marked complete only when whole


def index_digest(h: h5py.File, read: dict | None = None) -> str:
    """SHA-256 of the attributes (config, versions, skip lists...) and the string datasets.

    ``read``, when given, keeps every dataset read here under its name (``manifest/path``...),
    so opening a cache reads its manifest once for the digest and for its own use."""
    d = hashlib.sha256()
    for k in sorted(h.attrs):
        if k not in ("digest", "complete"):
            d.update(k.encode() + b"=" + str(h.attrs[k]).encode() + b"\n")
    read = {} if read is None else read

    def values(name):
        if name not in read:
            read[name] = h[name][:]
        return read[name]

    for grp in ("manifest", "skipped"):
        for k in sorted(h[grp]):
            if h[grp][k].dtype.kind == "O":
                d.update(f"{grp}/{k}:".encode() + joined(values(f"{grp}/{k}")))
    if TABLE in h:  # every field of the shard table: it is what binds the shards to this index
        for k in sorted(h[TABLE]):
            vals = values(f"{TABLE}/{k}")
            d.update(f"{TABLE}/{k}:".encode() + (joined(vals) if vals.dtype.kind == "O"
                                                   else np.ascontiguousarray(vals).tobytes()))
    return d.hexdigest()


def joined(values) -> bytes:
    """The strings of a dataset joined by NUL, as the digests hash them: bytes.join at C speed
    when h5py gave bytes (10^5 images: 0.1 s where a per-string conversion took 0.9 s)."""
    try:
        return b"\x00".join(values)
    except TypeError:
        return b"\x00".join(v if isinstance(v, bytes) else str(v).encode() for v in values)


def indexed_shards(index: Path) -> bool:
    """Whether an index holds the record of its shards (every index since covfeat bound shards to it)."""
    try:
        with h5py.File(index, "r") as h:
            return TABLE in h
    except OSError:
        return True  # unreadable: the verification that follows names the damage


def recorded_versions(index: Path) -> dict:
    """The library versions an index records its shards were made with ({}: none recorded)."""
    with h5py.File(index, "r") as h:
        return json.loads(h.attrs["versions"]) if "versions" in h.attrs else {}


class ShardTable:
    """The shards an index is made of, as it recorded them (see the module's docstring), with
    their files resolved from the index's real location."""

    def __init__(self, index: Path, h: h5py.File, read: dict | None = None):
        """``read``: the table's datasets :func:`index_digest` already read, by name (not read again)."""
        read = read or {}

        def t(k):
            return read[f"{TABLE}/{k}"] if f"{TABLE}/{k}" in read else h[TABLE][k][:]

        self.folder = Path(index).resolve().parent  # a symlinked index reads the shards beside its target
        self.key = str(h.attrs.get("key", ""))
        self.names = [v.decode() if isinstance(v, bytes) else str(v) for v in t("name")]
        self.start = t("start").astype(np.int64)
        self.samples = t("samples").astype(np.int64)
        self.images = t("images").astype(np.int64)
        self.bytes = t("bytes").astype(np.int64)
        self.members = t("members").astype(np.int64)
        self.features_sha256 = [v.decode() if isinstance(v, bytes) else str(v) for v in t("features_sha256")]
        self.digest = [v.decode() if isinstance(v, bytes) else str(v) for v in t("digest")]
        self.bounds = np.r_[self.start, self.start[-1] + self.samples[-1]] if len(self.start) else np.zeros(1, np.int64)
        self.first_member = np.r_[0, np.cumsum(self.images)]  # where each shard's rows start in ``members``

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> Path:
        return self.folder / self.names[i]

    def record(self, i: int) -> dict:
        return {"samples": int(self.samples[i]), "features_sha256": self.features_sha256[i], "digest": self.digest[i]}

    def rows(self, i: int) -> np.ndarray:
        """The manifest rows of shard ``i``, in its order."""
        return self.members[self.first_member[i]:self.first_member[i + 1]]  # one lookup: verify asks every shard

    def check(self, index: Path, full: bool = False) -> None:
        """Every shard is at its recorded place with its recorded size (one ``stat`` each: about
        0.05 ms a shard, where opening it with HDF5 costs 0.5 to 2 ms, so a cache of 3125 shards
        opens in well under a second); with ``full``, every shard is also opened, its attributes
        compared with the record, its digest recomputed and every feature hashed.  (A reader
        compares a shard's attributes and hashes its features on its first read of it.)  Raises
        CacheError naming the index, the shard and --rebuild."""
        from covfeat.store.shards import record_problem

        folder = str(self.folder)
        for i in range(len(self)):
            try:  # one stat of a plain string (a Path each costs more than the stat): a folder or a FIFO at a
                st = os.stat(os.path.join(folder, self.names[i]))  # shard's name is as missing as nothing there
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
            except OSError:
                size = None
            if size is None or size != self.bytes[i] or full:
                path = self.path(i)
            if size is None:
                raise damaged(index, f"shard {path} is missing")
            if size != self.bytes[i]:
                raise damaged(index, f"shard {path}: it is {size} bytes, its index recorded {self.bytes[i]} (another "
                                     "shard in its place?)")
            if not full:
                continue
            try:
                with h5py.File(path, "r") as h:
                    problem = record_problem(h, self.key, self.record(i), full)
            except OSError as exc:
                raise damaged(index, f"a checksum does not match in shard {path}: {str(exc).splitlines()[0]}") from None
            if problem:
                raise damaged(index, f"shard {path}: {problem}")


REBUILD = ("run the same `covfeat extract` with --rebuild to recompute the damaged parts and write the index again "
           "(--rebuild all: move everything aside and extract it all again)")


def damaged(path: Path, what: str) -> CacheError:
    return CacheError(f"{path} is damaged ({what}); {REBUILD}.")
