"""How features are stored: the HDF5 cache, its key, its lock, and crash-safe progress.

A cache is one HDF5 index file per (extraction config -- every field but those of
:data:`covfeat.config.NOT_IN_KEY` --, weights identity, content and labels of the data,
format version), named by a short hash of all of them, defaults included, over a folder
``<name>.shards/`` of immutable shard files.  It holds features, labels, patients,
sources, views and image hashes; no split: the split is a stage-two setting.  Each shard
is written to a temporary name, fsynced and renamed, by whichever driver computes it, so
a kill -9 or power loss loses at most the shards in flight.  The index's ``features`` is
a virtual dataset over the shards (no feature data is copied); it is written under a
temporary name once every shard is present and verified, marked ``complete`` and renamed
last: a file at the final path is always complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError, CacheLocked

FORMAT_VERSION = 3  # 2: no split in the cache; 3: an index over immutable shard files
MANIFEST_FIELDS = ("path", "label", "patient_id", "source", "view", "sha256")


def library_versions() -> dict[str, str]:
    import cv2
    import keras
    import tensorflow as tf

    from . import __version__

    return {
        "covfeat": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__, "h5py": h5py.__version__, "opencv": cv2.__version__,
    }


def cache_key(config: dict, manifest_rows: list[dict]) -> str:
    """Short hash of the full resolved config (defaults included) and the data's content."""
    payload = json.dumps({"format": FORMAT_VERSION, "config": config, "data": manifest_rows}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_name(backbone: str, weights_kind: str, key: str) -> str:
    return f"{backbone}-{weights_kind}-{key}.h5"


class CacheLock:
    """A non-blocking lock on ``<cache>.lock``; the OS drops it if we die.

    Exclusive for whatever must be alone (the local driver, writing the index, --rebuild,
    clean); shared (``shared=True``) for processes that only add shards (--shard slices, a
    Ray driver), so several may work at once while clean and --rebuild wait for them."""

    def __init__(self, target: Path, shared: bool = False):
        self.path = target.with_name(target.name + ".lock")
        self.shared = shared
        self._fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise CacheLocked(
                f"Another covfeat process (pid {holder}) is writing {self.path.with_suffix('').name}; "
                "wait for it to finish, or stop it and run again to resume."
            ) from None
        if not self.shared:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(str(os.getpid()))
            self._fh.flush()
        return self

    def __exit__(self, *exc):
        # The lock file stays: deleting it would let a process that opened the old file and a
        # process that creates a new one both hold "the" lock.
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


SHARD_IMAGES = 32  # images per shard
_HOST = __import__("socket").gethostname().replace(".", "_")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ShardSpec:
    """One shard: a fixed bucket of images, chosen by content hash alone (the manifest sorted by
    SHA-256, cut every SHARD_IMAGES), named by the hashes it holds and the cache key, so any
    driver, on any machine, retried any number of times, writes the same shard file."""

    index: int
    rows: tuple[int, ...]  # manifest rows in this shard, in SHA-256 order
    name: str


def plan_shards(rows: list[dict], key: str, size: int | None = None) -> list[ShardSpec]:
    size = size or SHARD_IMAGES
    order = sorted(range(len(rows)), key=lambda i: rows[i]["sha256"])
    out = []
    for k, a in enumerate(range(0, len(order), size)):
        members = tuple(order[a:a + size])
        h = hashlib.sha256((key + "".join(rows[i]["sha256"] for i in members)).encode()).hexdigest()[:16]
        out.append(ShardSpec(k, members, f"shard-{h}.h5"))
    return out


def _data_sha(ds) -> str:
    """SHA-256 of a dataset's values: Fletcher-32 cannot tell a 16-bit word 0x0000 from 0xFFFF."""
    d = hashlib.sha256()
    for a in range(0, ds.shape[0], 256):
        d.update(np.ascontiguousarray(ds[a:a + 256]).tobytes())
    return d.hexdigest()


def _shard_digest(h: h5py.File) -> str:
    """SHA-256 of everything in a shard but its features (which have their own): which sample
    belongs to which image, its view, its jitter, the image hashes, skips and fingerprints."""
    d = hashlib.sha256()
    for k in ("image", "view", "aug_params", "phash"):
        if k in h:
            d.update(k.encode() + np.ascontiguousarray(h[k][:]).tobytes())
    for k in ("sha256", "skipped"):
        d.update(k.encode() + b"\x00".join(v if isinstance(v, bytes) else str(v).encode() for v in h[k][:]))
    d.update(str(h.attrs.get("key", "")).encode())
    return d.hexdigest()


class ShardStore:
    """The immutable shard files of one cache, in ``<name>.shards/``.

    Each shard file holds the features of every view of every readable image of its bucket,
    their jitter, the skip reason of every unreadable one and every image's near-duplicate
    fingerprint.  It is written under a temporary name, fsynced and renamed: it exists only
    when complete, and nothing ever writes into it again.  Any process may add shards.
    """

    def __init__(self, target: Path, key: str):
        self.target = target
        self.key = key
        self.dir = target.with_name(target.name + ".shards")
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, spec: ShardSpec) -> Path:
        return self.dir / spec.name

    def present(self, specs: list[ShardSpec]) -> list[ShardSpec]:
        return [s for s in specs if self.path(s).is_file()]

    def missing(self, specs: list[ShardSpec]) -> list[ShardSpec]:
        return [s for s in specs if not self.path(s).is_file()]

    def write(self, spec: ShardSpec, shas: list[str], features: np.ndarray, images: np.ndarray, views: np.ndarray,
              params: np.ndarray, skipped: dict[int, str], fingerprints: dict[int, tuple]) -> Path:
        """Write one shard (``images``/``skipped``/``fingerprints`` index positions in ``shas``)."""
        from .neardup import CROPS, THUMB

        m = len(shas)
        hashes = np.zeros((m, len(CROPS)), np.uint64)
        thumbs = np.zeros((m, len(CROPS), THUMB, THUMB), np.uint8)
        for pos, (h, t) in fingerprints.items():
            hashes[pos], thumbs[pos] = h, t
        final = self.path(spec)
        tmp = final.with_name(f".{final.name}.{_HOST}.{os.getpid()}.tmp")
        kw = dict(track_times=False)
        with h5py.File(tmp, "w", track_order=False) as h:
            n = len(features)
            h.create_dataset("features", data=features, chunks=(1, *features.shape[1:]) if n else None,
                             fletcher32=bool(n), **kw)
            small = dict(chunks=True, fletcher32=True, **kw) if n else kw
            h.create_dataset("image", data=np.asarray(images, np.int32), **small)
            h.create_dataset("view", data=np.asarray(views, np.int8), **small)
            h.create_dataset("aug_params", data=np.asarray(params, np.float32).reshape(-1, 4), **small)
            _str_ds(h, "sha256", shas)
            _str_ds(h, "skipped", [skipped.get(i, "") for i in range(m)])
            h.create_dataset("phash", data=hashes, chunks=True, fletcher32=True, **kw)
            h.create_dataset("thumb", data=thumbs, chunks=(max(m, 1), *thumbs.shape[1:]), fletcher32=True, **kw)
            h.attrs["key"] = self.key
            h.attrs["features_sha256"] = hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()
            h.attrs["digest"] = _shard_digest(h)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def verify(self, spec: ShardSpec, rows: list[dict]) -> None:
        """A shard is whole, of this cache, holds the images its name says, and its checksums hold.

        Raises CacheError naming the shard."""
        path = self.path(spec)
        want = [rows[i]["sha256"] for i in spec.rows]
        try:
            with h5py.File(path, "r") as h:
                if h.attrs.get("key") != self.key or h.attrs.get("digest") != _shard_digest(h):
                    raise CacheError(f"shard {path} does not match its digest; delete it and run the extraction "
                                     "again to recompute it")
                if [v.decode() if isinstance(v, bytes) else v for v in h["sha256"][:]] != want:
                    raise CacheError(f"shard {path} holds other images than its name says")
                image, view = h["image"][:], h["view"][:]
                if len(image) != h["features"].shape[0] or len(view) != len(image) or (np.diff(image) < 0).any():
                    raise CacheError(f"shard {path} is damaged (its samples do not line up with its images)")
                h["thumb"][:]
                if _data_sha(h["features"]) != h.attrs.get("features_sha256"):  # reads (and checksums) every chunk
                    raise CacheError(f"shard {path} is damaged (its features do not match their SHA-256); delete it "
                                     "and run the extraction again to recompute it")
        except OSError as exc:
            raise CacheError(f"shard {path} is damaged ({str(exc).splitlines()[0]}); delete it and run the "
                             "extraction again to recompute it") from None

    def remove_stale_tmp(self) -> None:
        """Half-written shard files of writers that died on this host (their pid is in the name)."""
        from .runs import _alive

        for p in self.dir.glob(f".*.{_HOST}.*.tmp"):  # this host's only: another's pids mean nothing here
            try:
                pid = int(p.name.rsplit(".", 2)[-2])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                p.unlink(missing_ok=True)


def _str_ds(group, name, values):
    group.create_dataset(name, data=np.array([str(v) for v in values], dtype=h5py.string_dtype()), track_times=False)


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
    tmp = target.with_name(target.name + ".tmp")
    labels_m = np.array([int(r["label"]) for r in manifest], dtype=np.int8)
    from .neardup import CROPS, THUMB

    hashes = np.zeros((len(manifest), len(CROPS)), np.uint64)
    thumbs = np.zeros((len(manifest), len(CROPS), THUMB, THUMB), np.uint8)
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
    with h5py.File(tmp, "w") as h:
        h.create_virtual_dataset("features", layout, fillvalue=np.nan)
        h.create_dataset("row", data=rows, chunks=True, fletcher32=True)
        h.create_dataset("view", data=views, chunks=True, fletcher32=True)
        h.create_dataset("aug_params", data=params, chunks=True, fletcher32=True)
        h.create_dataset("label", data=labels_m[rows], chunks=True, fletcher32=True)
        g = h.create_group("manifest")
        for f in MANIFEST_FIELDS:
            _str_ds(g, f, [r[f] for r in manifest])
        g.create_dataset("phash", data=hashes, chunks=True, fletcher32=True)
        g.create_dataset("thumb", data=thumbs, chunks=(min(len(manifest), 256), *thumbs.shape[1:]), fletcher32=True)
        sk = h.create_group("skipped")
        _str_ds(sk, "path", [manifest[k]["path"] for k in sorted(skipped)])
        _str_ds(sk, "reason", [skipped[k] for k in sorted(skipped)])
        h.attrs["config"] = json.dumps(config, sort_keys=True)
        h.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)
        h.attrs["format_version"] = FORMAT_VERSION
        h.attrs["shards"] = json.dumps([[os.path.relpath(store.path(s), target.parent), s.index] for s in specs])
        for k, v in extra.items():
            h.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        h.attrs["digest"] = _digest(h)  # what Fletcher-32 cannot cover: attributes and strings
        h.flush()
        h.attrs["complete"] = True  # last, so a crash above leaves an incomplete .tmp
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def shard_fingerprints(store: ShardStore, specs: list[ShardSpec], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image's fingerprint from the shards present (zeros where none)."""
    from .neardup import CROPS, THUMB

    hashes = np.zeros((n, len(CROPS)), np.uint64)
    thumbs = np.zeros((n, len(CROPS), THUMB, THUMB), np.uint8)
    for spec in store.present(specs):
        with h5py.File(store.path(spec), "r") as h:
            hashes[list(spec.rows)] = h["phash"][:]
            thumbs[list(spec.rows)] = h["thumb"][:]
    return hashes, thumbs


def shard_skips(store: ShardStore, specs: list[ShardSpec]) -> dict[int, str]:
    out = {}
    for spec in store.present(specs):
        with h5py.File(store.path(spec), "r") as h:
            for pos, v in enumerate(h["skipped"][:]):
                v = v.decode() if isinstance(v, bytes) else str(v)
                if v:
                    out[spec.rows[pos]] = v
    return out


def _digest(h: h5py.File) -> str:
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


def verify_cache(path: str | Path, progress=None) -> dict:
    """Check a whole cache: complete, of this format, its digest, and every chunk of every
    dataset against its Fletcher-32 checksum.  Returns counts; raises CacheError naming the
    cache and the way out.

    Raises
    ------
    CacheError
    """
    path = Path(path)
    fc = open_cache(path)  # complete, format, digest
    n_chunks = 0
    try:
        with h5py.File(path, "r") as h:
            def visit(name, obj):
                nonlocal n_chunks
                # The virtual features are read once below, shard by shard (checksums and SHA-256).
                if isinstance(obj, h5py.Dataset) and obj.chunks is not None and not obj.is_virtual:
                    step = obj.chunks[0] * 64
                    for a in range(0, obj.shape[0], step):
                        obj[a:a + step]
                    n_chunks += obj.id.get_num_chunks()
            h.visititems(visit)
    except OSError as exc:
        raise damaged(path, f"a checksum does not match: {str(exc).splitlines()[0]}") from None
    for rel, _ in json.loads(fc.attrs.get("shards", "[]")):
        shard = path.parent / rel
        try:
            with h5py.File(shard, "r") as h:
                ok = _data_sha(h["features"]) == h.attrs.get("features_sha256")
        except OSError as exc:
            raise damaged(path, f"a checksum does not match in shard {shard}: {str(exc).splitlines()[0]}") from None
        if not ok:
            raise damaged(path, f"shard {shard}: its features do not match their SHA-256")
    return {"path": str(path), "samples": int(len(fc.labels)), "images": int(fc.n_rows), "chunks": n_chunks}


def move_aside(target: Path) -> list[Path]:
    """Rename a (damaged or unwanted) cache and its shard folder out of the way; never delete."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in (target, target.with_name(target.name + ".shards")):
        if p.exists():
            dest = p.with_name(f"{p.name}.damaged-{stamp}")
            os.replace(p, dest)
            moved.append(dest)
    return moved


@dataclass
class FeatureCache:
    """A complete cache opened for reading: small arrays in memory, features on demand."""

    path: Path
    config: dict
    labels: np.ndarray  # per sample
    view: np.ndarray  # per sample, 0 = original
    row: np.ndarray  # per sample, index into manifest
    manifest: dict[str, np.ndarray]
    skipped: list[tuple[str, str]]
    attrs: dict

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def pretrained(self) -> bool:
        return bool(self.config["weights"]["pretrained"])

    @property
    def weights_label(self) -> str:
        return self.config["weights"]["label"]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        with h5py.File(self.path, "r") as h:
            return tuple(h["features"].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        with h5py.File(self.path, "r") as h:
            return h["features"].dtype

    @property
    def n_views(self) -> int:
        return int(self.view.max()) + 1

    @property
    def n_rows(self) -> int:
        """Images in the manifest (with features or skipped)."""
        return len(self.manifest["label"])

    def samples(self) -> dict[int, np.ndarray]:
        """Manifest row -> its sample indices, ordered by view (skipped rows have none)."""
        if getattr(self, "_samples", None) is None:
            order = np.lexsort((self.view, self.row))
            rows_sorted = self.row[order]
            starts = np.flatnonzero(np.r_[True, rows_sorted[1:] != rows_sorted[:-1]])
            V = self.n_views
            self._samples = {int(rows_sorted[s]): order[s:s + V] for s in starts}
        return self._samples

    def fingerprints(self, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Near-duplicate fingerprints (hashes, thumbnails) of manifest ``rows`` (all when None)."""
        with h5py.File(self.path, "r") as h:
            g = h["manifest"]
            if "phash" not in g:
                from .neardup import CROPS, THUMB

                n = self.n_rows if rows is None else len(rows)
                return np.zeros((n, len(CROPS)), np.uint64), np.zeros((n, len(CROPS), THUMB, THUMB), np.uint8)
            thumbs = g["thumb"][:]
        hashes = self.manifest["phash"]
        if rows is None:
            return hashes, thumbs
        rows = np.asarray(rows, np.int64)
        return hashes[rows], thumbs[rows]

    def near_duplicate_pairs(self) -> list[tuple[int, int, int, float]]:
        """The near-duplicate pairs (row i, row j, bits, correlation) found at extraction."""
        nd = self.attrs.get("near_duplicates")
        return [tuple(p) for p in json.loads(nd)["pairs"]] if nd is not None else []

    def has_features(self) -> np.ndarray:
        """Per manifest row: True when the image was readable and has features."""
        ok = np.zeros(self.n_rows, bool)
        ok[np.unique(self.row)] = True
        return ok

    def originals(self, rows) -> np.ndarray:
        """Sample indices of view 0 (the original) of manifest ``rows``."""
        s = self.samples()
        return np.array([s[int(r)][0] for r in rows], np.int64)

    def content_hash(self) -> str:
        return self.path.stem.rsplit("-", 1)[-1]

    def read_features(self, idx: np.ndarray | None = None, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
        """Features of the given sample indices (all when None), in that order, as float32.

        With ``out`` (a float32 array of shape (len(idx), ...)) they are written there.
        """
        try:
            out = self._read_features(idx, dtype, out)
        except OSError as exc:
            raise damaged(self.path, f"a checksum does not match: {str(exc).splitlines()[0]}") from None
        # Extraction stores finite values only; Fletcher-32 cannot tell 0x0000 from 0xFFFF, which in
        # float16 is a NaN, so a non-finite value read back is damage too.
        from .kernels import all_finite

        if len(out) and not all_finite(out):
            raise damaged(self.path, "non-finite feature values read back")
        return out

    def _read_features(self, idx, dtype, out):
        from .kernels import f16_rows_into

        with h5py.File(self.path, "r") as h:
            ds = h["features"]
            idx = np.arange(ds.shape[0]) if idx is None else np.asarray(idx, np.int64)
            if out is None:
                out = np.empty((len(idx), *ds.shape[1:]), dtype=dtype)
            if not len(idx):
                return out
            # h5py's fancy indexing is ~100x slower than slices: read sorted contiguous runs.
            order = np.argsort(idx, kind="stable")
            s = idx[order]
            breaks = np.flatnonzero(np.diff(s) > 1) + 1
            for run in np.split(np.arange(len(s)), breaks):
                a, b = s[run[0]], s[run[-1]] + 1
                block = ds[a:b][s[run] - a]
                if block.dtype == np.float16 and out.dtype == np.float32:
                    f16_rows_into(block, out, order[run])
                else:
                    out[order[run]] = block
            return out


def open_cache(path: str | Path) -> FeatureCache:
    """Open a complete cache, checking its format.

    Raises
    ------
    CacheError
        Missing, incomplete, unreadable or of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file; run `covfeat extract` first.")
    try:
        with h5py.File(path, "r") as h:
            if not h.attrs.get("complete", False):
                raise damaged(path, "not marked complete")
            if int(h.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise CacheError(
                    f"{path} has format version {h.attrs.get('format_version')}, this covfeat reads "
                    f"{FORMAT_VERSION}; {REBUILD}."
                )
            if h.attrs.get("digest") != _digest(h):
                raise damaged(path, "its attributes or manifest do not match their digest")
            for rel, _ in json.loads(h.attrs.get("shards", "[]")):
                if not (path.parent / rel).is_file():  # a missing source would read as fill values
                    raise damaged(path, f"shard {path.parent / rel} is missing")
            config = json.loads(h.attrs["config"])
            man = {k: h["manifest"][k][:] for k in h["manifest"] if k != "thumb"}  # thumbnails on demand
            for k in MANIFEST_FIELDS:
                man[k] = np.array([v.decode() if isinstance(v, bytes) else v for v in man[k]])
            man["label"] = man["label"].astype(int)
            skipped = list(zip((p.decode() for p in h["skipped"]["path"][:]),
                               (r.decode() for r in h["skipped"]["reason"][:])))
            attrs = {k: h.attrs[k] for k in h.attrs}
            return FeatureCache(path, config, h["label"][:], h["view"][:], h["row"][:], man, skipped, attrs)
    except CacheError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "unable to lock file" in text.lower():
            raise CacheError(f"{path} cannot be opened because HDF5 cannot lock it ({text}); on a file system without "
                             "locks set HDF5_USE_FILE_LOCKING=FALSE.") from None
        raise damaged(path, f"not a readable HDF5 cache: {text}") from None


def choose_cache(cache: str | Path | None, backbone: str | None, cache_dir: str | Path,
                 data: list | None = None) -> Path:
    """The cache a stage-two command works on, never a guess.

    ``cache`` if given; else the complete caches of ``backbone`` in ``cache_dir``: exactly one
    is taken; with ``data``, the one whose images are exactly those of the data (by content);
    several are an error that lists them.

    Raises
    ------
    ConfigError, CacheError
    """
    from .errors import ConfigError

    if cache is not None:
        return Path(cache)
    if backbone is None:
        raise ConfigError("pass --cache FILE or --backbone NAME (with --data SRC when several caches of it exist).")
    found = complete_caches(cache_dir, backbone)
    if not found:
        raise CacheError(f"No complete cache of {backbone} in {cache_dir}; run `covfeat extract --backbone {backbone}` "
                         "first.")
    if data:
        from .sources import load_sources

        picked = []
        for p in found:
            fc = open_cache(p)
            views = tuple(fc.config.get("views", ("PA",)))
            want = {r.sha256 for r in load_sources(data, views=views, on_conflict="skip").records}
            if set(fc.manifest["sha256"]) == want:
                picked.append(p)
        found = picked
        if not found:
            raise CacheError(f"No complete cache of {backbone} in {cache_dir} holds exactly the images of --data; "
                             f"run `covfeat extract --backbone {backbone} --data ...` first.")
    if len(found) > 1:
        listing = "; ".join(describe_cache(p) for p in found)
        raise ConfigError(f"{len(found)} complete caches of {backbone} in {cache_dir}: {listing}. Pass --cache FILE, "
                          "or --data SRC to pick the one made from those images.")
    return found[0]


def complete_caches(cache_dir: str | Path, backbone: str) -> list[Path]:
    out = []
    for p in sorted(Path(cache_dir).glob(f"{backbone}-*.h5")):
        try:
            with h5py.File(p, "r") as h:
                if h.attrs.get("complete", False):
                    out.append(p)
        except OSError:
            continue
    return out


def describe_cache(path: str | Path) -> str:
    """One line: path, backbone, weights, image counts, date."""
    import time

    fc = open_cache(path)
    labels = fc.manifest["label"][fc.has_features()]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(path).stat().st_mtime))
    return (f"{path} ({fc.backbone}, weights {fc.weights_label}, {len(labels)} images: {int((labels == 1).sum())} "
            f"COVID-19, {int((labels == 0).sum())} NORMAL, {len(fc.skipped)} skipped; made {when})")


def info(path: str | Path) -> str:
    """Everything a user may want to know about a cache: config, counts, and every file that is
    not in it, with the reason."""
    fc = open_cache(path)
    a = fc.attrs
    lines = [describe_cache(path), "config: " + json.dumps(fc.config, sort_keys=True)]
    nd = json.loads(a.get("near_duplicates", '{"pairs": []}'))
    lines.append(f"near-duplicate pairs: {len(nd['pairs'])}")
    for i, j, d, c in nd["pairs"]:
        lines.append(f"  {fc.manifest['path'][i]} ~ {fc.manifest['path'][j]} ({d} bits, correlation {c})")
    for key, title in (("missing", "listed but missing"), ("broken_links", "broken links"),
                       ("not_images", "not opened (not an image file name)"), ("conflicts", "conflicting labels"),
                       ("duplicates", "byte-identical duplicates dropped")):
        items = json.loads(a.get(key, "[]"))
        lines.append(f"{title}: {len(items)}")
        lines += [f"  {x[0]}: {x[1]}" for x in items]
    lines.append(f"skipped at extraction: {len(fc.skipped)}")
    lines += [f"  {p}: {why}" for p, why in fc.skipped]
    return "\n".join(lines)


def find_latest_cache(cache_dir: str | Path, backbone: str) -> Path:
    """Kept for callers of covfeat 0.1: the single complete cache of a backbone (see choose_cache)."""
    return choose_cache(None, backbone, cache_dir)


def clean_cache_dir(cache_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove shard folders and temporary files of caches no live process is writing (the
    lock tells); return (removed, moved-aside caches left for the user)."""
    removed, kept = [], []
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return removed, kept
    for p in sorted(cache_dir.iterdir()):
        if ".damaged-" in p.name:
            kept.append(p)
            continue
        if p.name.endswith(".shards") and not p.with_name(p.name[:-len(".shards")]).exists() \
                or p.name.endswith(".partial") or p.name.endswith(".h5.tmp"):
            target = p.with_name(p.name.rsplit(".", 1)[0])
            try:
                with CacheLock(target):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
            except CacheLocked:
                continue
    return removed, kept
