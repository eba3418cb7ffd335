"""How features are stored: the HDF5 cache, its key, its lock, and crash-safe progress.

A cache is one HDF5 file per (extraction config -- every field but those of
:data:`covfeat.config.NOT_IN_KEY` --, weights identity, content and labels of the data,
format version), named by a short hash of all of them, defaults included.  It holds
features, labels, patients, sources, views and image hashes; no split: the split is a
stage-two setting, so changing it reuses the cache.  While extraction runs, finished work lives in
``<name>.partial/`` as shard files, each written to a temporary name, fsynced and
renamed, so a kill -9 or power loss loses at most the shard in flight.  The HDF5 file is
assembled from the shards under a temporary name, marked ``complete`` and renamed last:
a file at the final path is always complete.
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

FORMAT_VERSION = 2  # 2: no split in the cache (it moved to fit-head)
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
    """An exclusive, non-blocking lock on ``<cache>.lock``; the OS drops it if we die."""

    def __init__(self, target: Path):
        self.path = target.with_name(target.name + ".lock")
        self._fh = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise CacheLocked(
                f"Another covfeat process (pid {holder}) is writing {self.path.with_suffix('').name}; "
                "wait for it to finish, or stop it and run again to resume."
            ) from None
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


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardStore:
    """Finished extraction work of one cache, as durable shard files in ``<name>.partial/``.

    A shard covers a contiguous range of manifest rows: the features of every view of
    every readable row in it, and the skip reason of every unreadable one.
    """

    def __init__(self, target: Path, config: dict):
        self.dir = target.with_name(target.name + ".partial")
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "config.json"
        text = json.dumps(config, sort_keys=True)
        if stamp.exists() and stamp.read_text() != text:
            # Same key means same config; a mismatch is a corrupted folder, not a resume.
            shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
        if not stamp.exists():
            _atomic_write(stamp, lambda f: f.write(text.encode()))

    def shards(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.dir.glob("shard_*.npz"):
            a, b = p.stem.split("_")[1:3]
            out.append((int(a), int(b), p))
        return sorted(out)

    def rows_done(self) -> int:
        """Rows [0, n) are finished; resume from n (shards are written in order)."""
        n = 0
        for a, b, _ in self.shards():
            if a != n:
                break
            n = b
        return n

    def write(self, start: int, stop: int, features: np.ndarray, rows: np.ndarray, views: np.ndarray,
              params: np.ndarray, skipped: dict[int, str], fingerprints: dict | None = None) -> None:
        """One shard: the maps of rows [start, stop), their skip reasons, and the near-duplicate
        fingerprint (hashes, thumbnails) of every readable row."""
        path = self.dir / f"shard_{start:08d}_{stop:08d}.npz"
        meta = json.dumps({str(k): v for k, v in skipped.items()})
        from .neardup import CROPS, THUMB

        fp = fingerprints or {}
        fp_rows = np.array(sorted(fp), np.int64)
        fp_hash = np.array([fp[r][0] for r in fp_rows], np.uint64).reshape(len(fp_rows), len(CROPS))
        fp_thumb = np.array([fp[r][1] for r in fp_rows], np.uint8).reshape(len(fp_rows), len(CROPS), THUMB, THUMB)
        _atomic_write(path, lambda f: np.savez(f, features=features, rows=rows, views=views, params=params,
                                                skipped=np.array(meta), fp_rows=fp_rows, fp_hash=fp_hash,
                                                fp_thumb=fp_thumb))

    def fingerprints(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(hashes (n, 4) uint64, thumbnails (n, 4, 32, 32) uint8) of every row; zeros where none."""
        from .neardup import CROPS, THUMB

        hashes = np.zeros((n, len(CROPS)), np.uint64)
        thumbs = np.zeros((n, len(CROPS), THUMB, THUMB), np.uint8)
        for _, _, p in self.shards():
            with np.load(p) as z:
                if "fp_rows" in z and len(z["fp_rows"]):
                    hashes[z["fp_rows"]] = z["fp_hash"]
                    thumbs[z["fp_rows"]] = z["fp_thumb"]
        return hashes, thumbs

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _str_ds(group, name, values):
    group.create_dataset(name, data=np.array([str(v) for v in values], dtype=h5py.string_dtype()))


def assemble(target: Path, store: ShardStore, *, config: dict, manifest: list[dict],
             feature_shape: tuple, dtype: str, extra: dict) -> None:
    """Stream every shard into ``target`` (via a temporary name), mark it complete, rename."""
    shards = store.shards()
    n = 0
    skipped: dict[int, str] = {}
    for _, _, p in shards:
        with np.load(p) as z:
            n += len(z["rows"])
            skipped.update({int(k): v for k, v in json.loads(str(z["skipped"])).items()})
    tmp = target.with_name(target.name + ".tmp")
    with h5py.File(tmp, "w") as h:
        # Fletcher-32 on every numeric dataset: HDF5 verifies each chunk whenever it is read.
        feats = h.create_dataset("features", shape=(n, *feature_shape), dtype=dtype, chunks=(1, *feature_shape),
                                 fletcher32=True)
        rows = h.create_dataset("row", shape=(n,), dtype="i4", chunks=True, fletcher32=True)
        views = h.create_dataset("view", shape=(n,), dtype="i1", chunks=True, fletcher32=True)
        params = h.create_dataset("aug_params", shape=(n, 4), dtype="f4", chunks=True, fletcher32=True)
        i = 0
        for _, _, p in shards:
            with np.load(p) as z:
                k = len(z["rows"])
                feats[i:i + k] = z["features"]
                rows[i:i + k] = z["rows"]
                views[i:i + k] = z["views"]
                params[i:i + k] = z["params"]
                i += k
        row_idx = rows[:]
        labels = np.array([int(r["label"]) for r in manifest], dtype=np.int8)
        h.create_dataset("label", data=labels[row_idx], chunks=True, fletcher32=True)
        g = h.create_group("manifest")
        for f in MANIFEST_FIELDS:
            _str_ds(g, f, [r[f] for r in manifest])
        hashes, thumbs = store.fingerprints(len(manifest))
        g.create_dataset("phash", data=hashes, chunks=True, fletcher32=True)
        g.create_dataset("thumb", data=thumbs, chunks=(min(len(manifest), 256), *thumbs.shape[1:]), fletcher32=True)
        s = h.create_group("skipped")
        _str_ds(s, "path", [manifest[k]["path"] for k in sorted(skipped)])
        _str_ds(s, "reason", [skipped[k] for k in sorted(skipped)])
        h.attrs["config"] = json.dumps(config, sort_keys=True)
        h.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)
        h.attrs["format_version"] = FORMAT_VERSION
        for k, v in extra.items():
            h.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        h.attrs["digest"] = _digest(h)  # what Fletcher-32 cannot cover: attributes and strings
        h.flush()
        h.attrs["complete"] = True  # last, so a crash above leaves an incomplete .tmp
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


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
                if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                    step = obj.chunks[0] * 64
                    for a in range(0, obj.shape[0], step):
                        obj[a:a + step]
                    n_chunks += obj.id.get_num_chunks()
            h.visititems(visit)
    except OSError as exc:
        raise damaged(path, f"a checksum does not match: {str(exc).splitlines()[0]}") from None
    return {"path": str(path), "samples": int(len(fc.labels)), "images": int(fc.n_rows), "chunks": n_chunks}


def move_aside(target: Path) -> list[Path]:
    """Rename a (damaged or unwanted) cache and its shard folder out of the way; never delete."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in (target, target.with_name(target.name + ".partial")):
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
            return self._read_features(idx, dtype, out)
        except OSError as exc:
            raise damaged(self.path, f"a checksum does not match: {str(exc).splitlines()[0]}") from None

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
            config = json.loads(h.attrs["config"])
            man = {k: h["manifest"][k][:] for k in h["manifest"] if k != "thumb"}  # thumbnails on demand
            for k in MANIFEST_FIELDS:
                man[k] = np.array([v.decode() if isinstance(v, bytes) else v for v in man[k]])
            man["label"] = man["label"].astype(int)
            skipped = list(zip((p.decode() for p in h["skipped"]["path"][:]),
                               (r.decode() for r in h["skipped"]["reason"][:])))
            attrs = {k: h.attrs[k] for k in h.attrs}
            return FeatureCache(path, config, h["label"][:], h["view"][:], h["row"][:], man, skipped, attrs)
    except (OSError, KeyError, ValueError) as exc:
        raise damaged(path, f"not a readable HDF5 cache: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


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

        want = {r.sha256 for r in load_sources(data).records}
        found = [p for p in found if set(open_cache(p).manifest["sha256"]) == want]
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
        if p.name.endswith(".partial") or p.name.endswith(".h5.tmp"):
            target = p.with_name(p.name.rsplit(".", 1)[0])
            try:
                with CacheLock(target):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
            except CacheLocked:
                continue
    return removed, kept
