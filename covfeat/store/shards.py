"""Immutable shard files: a fixed bucket of images each, written whole or not at all, verified.

Each shard is chosen by content hash alone and named by the hashes it holds and the cache
key, so any driver, on any machine, retried any number of times, writes the same file.  It
is written as an atomic file (:func:`covfeat.core.fsutil.atomic_file`: a temporary name,
fsynced, renamed), so a kill -9 or power loss loses at most the shards in flight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from covfeat.core.errors import CacheError
from covfeat.core.fsutil import atomic_file, remove_stale

SHARD_IMAGES = 32  # images per shard


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


def data_sha256(ds) -> str:
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
        from covfeat.trust.neardup import FINGERPRINT_HASHES, FINGERPRINT_THUMB_SHAPE

        m = len(shas)
        hashes = np.zeros((m, FINGERPRINT_HASHES), np.uint64)
        thumbs = np.zeros((m, *FINGERPRINT_THUMB_SHAPE), np.uint8)
        for pos, (h, t) in fingerprints.items():
            hashes[pos], thumbs[pos] = h, t
        final = self.path(spec)
        kw = dict(track_times=False)
        with atomic_file(final) as tmp, h5py.File(tmp, "w", track_order=False) as h:
            n = len(features)
            h.create_dataset("features", data=features, chunks=(1, *features.shape[1:]) if n else None,
                             fletcher32=bool(n), **kw)
            small = dict(chunks=True, fletcher32=True, **kw) if n else kw
            h.create_dataset("image", data=np.asarray(images, np.int32), **small)
            h.create_dataset("view", data=np.asarray(views, np.int8), **small)
            h.create_dataset("aug_params", data=np.asarray(params, np.float32).reshape(-1, 4), **small)
            string_dataset(h, "sha256", shas)
            string_dataset(h, "skipped", [skipped.get(i, "") for i in range(m)])
            h.create_dataset("phash", data=hashes, chunks=True, fletcher32=True, **kw)
            h.create_dataset("thumb", data=thumbs, chunks=(max(m, 1), *thumbs.shape[1:]), fletcher32=True, **kw)
            h.attrs["key"] = self.key
            h.attrs["features_sha256"] = hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()
            h.attrs["digest"] = _shard_digest(h)
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
                if data_sha256(h["features"]) != h.attrs.get("features_sha256"):  # reads (and checksums) every chunk
                    raise CacheError(f"shard {path} is damaged (its features do not match their SHA-256); delete it "
                                     "and run the extraction again to recompute it")
        except OSError as exc:
            raise CacheError(f"shard {path} is damaged ({str(exc).splitlines()[0]}); delete it and run the "
                             "extraction again to recompute it") from None

    def remove_stale_tmp(self) -> list[Path]:
        """Half-written shard files of writers that died on this host (:func:`remove_stale`)."""
        return remove_stale(self.dir)


def string_dataset(group, name, values):
    group.create_dataset(name, data=np.array([str(v) for v in values], dtype=h5py.string_dtype()), track_times=False)


def shard_fingerprints(store: ShardStore, specs: list[ShardSpec], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image's fingerprint from the shards present (zeros where none)."""
    from covfeat.trust.neardup import FINGERPRINT_HASHES, FINGERPRINT_THUMB_SHAPE

    hashes = np.zeros((n, FINGERPRINT_HASHES), np.uint64)
    thumbs = np.zeros((n, *FINGERPRINT_THUMB_SHAPE), np.uint8)
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
