"""Immutable shard files: a fixed bucket of images each, written whole or not at all, verified.

Each shard is chosen by content hash alone and named by the hashes it holds and the cache
key, so any driver, on any machine, retried any number of times, writes the same file.  It
is written as an atomic file (:func:`covfeat.core.fsutil.atomic_file`: a temporary name,
fsynced, renamed), so a kill -9 or power loss loses at most the shards in flight.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from covfeat.core.errors import CacheError
from covfeat.core.fsutil import atomic_file, remove_stale
from covfeat.store.key import library_versions, version_difference

SHARD_IMAGES = 32  # images per shard

# What every refusal of one shard tells the user: --rebuild moves the shards that fail
# verification aside (kept, never deleted) and computes only those again.
REDO_SHARD = "run the same `covfeat extract` with --rebuild (it moves the damaged shards aside and computes them again)"


@dataclass(frozen=True)
class ShardSpec:
    """One shard: a fixed bucket of images, chosen by content hash alone (the manifest sorted by
    SHA-256, cut every SHARD_IMAGES), named by the hashes it holds and the cache key, so any
    driver, on any machine, retried any number of times, writes the same shard file."""

    index: int
    rows: tuple[int, ...]  # manifest rows in this shard, in SHA-256 order
    name: str


def plan_shards(rows: list[dict], key: str, size: int | None = None) -> list[ShardSpec]:
    """The shards of ``rows``: sorted by SHA-256 (ties in manifest order), cut every ``size``,
    each named by the hash of the key and its members' SHA-256s joined.

    Hex digests (ASCII, one width, no NUL) are sorted as one buffer of fixed-width bytes by
    numpy's stable argsort, and each name hashes a slice of that buffer sorted: the same plan
    and names as a Python sort of the rows with a join per shard, whose cost per image grew
    fourfold from 10^3 to 10^5 images (each comparison chasing two strings through memory).
    Any other strings (never a manifest's) take that Python sort, which numpy's fixed-width
    strings cannot match for them (they ignore trailing NULs)."""
    size = size or SHARD_IMAGES
    shas = [r["sha256"] for r in rows]
    joined = "".join(shas)
    width = len(shas[0]) if shas else 0
    if width and joined.isascii() and "\x00" not in joined and len(joined) == width * len(shas) \
            and all(n == width for n in map(len, shas)):
        keys = np.frombuffer(joined.encode("ascii"), f"S{width}")
        sorted_order = fixed_width_order(keys)
        blob, order = keys[sorted_order].tobytes(), sorted_order.tolist()
        ends = range(width, width * len(order) + 1, width)
    else:
        order = sorted(range(len(shas)), key=shas.__getitem__)
        encoded = [shas[i].encode() for i in order]
        blob, ends = b"".join(encoded), np.cumsum([len(e) for e in encoded]).tolist()
    kb = key.encode()
    out = []
    for k, a in enumerate(range(0, len(order), size)):
        b = min(a + size, len(order))
        h = hashlib.sha256(kb + blob[ends[a - 1] if a else 0:ends[b - 1]]).hexdigest()[:16]
        out.append(ShardSpec(k, tuple(order[a:b]), f"shard-{h}.h5"))
    return out


def fixed_width_order(keys: np.ndarray) -> np.ndarray:
    """The stable argsort of fixed-width byte strings: by their first 8 bytes as one big-endian
    integer (a contiguous integer sort), then the runs that tie there by the whole string."""
    width = keys.dtype.itemsize
    head = np.zeros((len(keys), 8), np.uint8)
    head[:, :min(width, 8)] = keys.view(np.uint8).reshape(len(keys), width)[:, :8]
    prefix = head.view(">u8").ravel()
    order = np.argsort(prefix, kind="stable")
    if width > 8:
        p = prefix[order]
        tie = np.flatnonzero(p[1:] == p[:-1])
        if len(tie):  # runs of equal prefixes: each sorted again by the whole string, stably
            starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
            ends = np.r_[starts[1:], len(p)]
            for a, b in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
                run = order[a:b]
                order[a:b] = run[np.argsort(keys[run], kind="stable")]
    return order


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
    if "versions" in h.attrs:  # shards of covfeat before versions were recorded keep their digest
        d.update(b"versions=" + str(h.attrs["versions"]).encode())
    return d.hexdigest()


def stored_versions(h: h5py.File) -> dict:
    """The library versions a shard or an index records ({} when it records none)."""
    return json.loads(h.attrs["versions"]) if "versions" in h.attrs else {}


def common_versions(store: "ShardStore", specs: list[ShardSpec]) -> dict:
    """The library versions every shard of ``specs`` records.  Shards made with different
    versions are never merged: their features would not be comparable.

    Raises
    ------
    CacheError
        Naming a shard of each versions, what differs, and --rebuild.
    """
    first, seen = None, {}
    for spec in specs:
        with h5py.File(store.path(spec), "r") as h:
            v = stored_versions(h)
        if first is None:
            first, seen = store.path(spec), v
        elif v != seen:
            raise CacheError(f"shards made with different library versions: {first} and {store.path(spec)} "
                             f"({version_difference(seen, v)}); run the same `covfeat extract` with --rebuild to "
                             "recompute the shards of other versions than this covfeat's.")
    return seen


def record_problem(h: h5py.File, key: str, rec: dict, full: bool = False) -> str | None:
    """What makes an open shard other than the one an index recorded (``rec``: its samples,
    features SHA-256 and digest), or None.  The cheap part reads attributes and a shape; with
    ``full``, the digest is recomputed and every feature read and hashed, so a shard whose
    attributes were forged along with its bytes is caught too."""
    if h.attrs.get("key") != key:
        return f"it belongs to the cache of key {h.attrs.get('key')}, not {key}"
    if h.attrs.get("digest") != rec["digest"] or h.attrs.get("features_sha256") != rec["features_sha256"]:
        return "it is not the shard its index recorded (its digest or features SHA-256 differ)"
    if h["features"].shape[0] != rec["samples"]:
        return f"it holds {h['features'].shape[0]} samples, its index recorded {rec['samples']}"
    if full:
        if _shard_digest(h) != rec["digest"]:
            return "its contents do not match the digest its index recorded"
        if data_sha256(h["features"]) != rec["features_sha256"]:
            return "its features do not match the SHA-256 its index recorded"
    return None


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
            h.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)  # this process's, on any node
            h.attrs["features_sha256"] = hashlib.sha256(np.ascontiguousarray(features).tobytes()).hexdigest()
            h.attrs["digest"] = _shard_digest(h)
        return final

    def verify(self, spec: ShardSpec, rows: list[dict], versions: dict | None = None) -> None:
        """A shard is whole, of this cache, made with ``versions`` (default: this process's
        :func:`library_versions`), holds the images its name says, and its checksums hold.

        A shard of other library versions counts as damaged: its features may differ from the
        ones this covfeat computes, so it is recomputed rather than mixed with them.

        Raises CacheError naming the shard."""
        path = self.path(spec)
        want = [rows[i]["sha256"] for i in spec.rows]
        versions = library_versions() if versions is None else versions
        try:
            with h5py.File(path, "r") as h:
                if h.attrs.get("key") != self.key or h.attrs.get("digest") != _shard_digest(h):
                    raise CacheError(f"shard {path} does not match its digest; {REDO_SHARD}")
                if stored_versions(h) != versions:
                    raise CacheError(f"shard {path} was made with other library versions than this covfeat's "
                                     f"({version_difference(stored_versions(h), versions)}); {REDO_SHARD}")
                if [v.decode() if isinstance(v, bytes) else v for v in h["sha256"][:]] != want:
                    raise CacheError(f"shard {path} holds other images than its name says; {REDO_SHARD}")
                image, view = h["image"][:], h["view"][:]
                if len(image) != h["features"].shape[0] or len(view) != len(image) or (np.diff(image) < 0).any():
                    raise CacheError(f"shard {path} is damaged (its samples do not line up with its images); "
                                     f"{REDO_SHARD}")
                h["thumb"][:]
                if data_sha256(h["features"]) != h.attrs.get("features_sha256"):  # reads (and checksums) every chunk
                    raise CacheError(f"shard {path} is damaged (its features do not match their SHA-256); {REDO_SHARD}")
        except OSError as exc:
            raise CacheError(f"shard {path} is damaged ({str(exc).splitlines()[0]}); {REDO_SHARD}") from None

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
