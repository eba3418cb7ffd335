"""The caches of a folder: choose one, describe it, verify it, move it aside, clean leftovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

from covfeat.core.errors import CacheError, CacheLocked
from covfeat.core.fsutil import remove_stale
from covfeat.store.index import damaged
from covfeat.store.key import key_in_name
from covfeat.store.lock import CacheLock
from covfeat.store.reader import open_cache


def verify_cache(path: str | Path, progress=None) -> dict:
    """Check a whole cache: complete, of this format, its digest, every chunk of every
    dataset against its Fletcher-32 checksum, and every shard against the index's record of it
    (its digest recomputed, the SHA-256 of all its features, the images it holds).  Returns counts; raises CacheError naming the
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
    # Every shard against the index's record: recomputed digest, every feature hashed, its images.
    fc.table.check(path, full=True)
    for i in range(len(fc.table)):
        shard = fc.table.path(i)
        with h5py.File(shard, "r") as h:
            held = [v.decode() if isinstance(v, bytes) else str(v) for v in h["sha256"][:]]
        if held != list(fc.manifest["sha256"][fc.table.rows(i)]):
            raise damaged(path, f"shard {shard}: it holds other images than its index recorded")
    return {"path": str(path), "samples": int(len(fc.labels)), "images": int(fc.n_rows), "chunks": n_chunks}


def move_aside(target: Path, *, shards: bool = True) -> list[Path]:
    """Rename a (damaged or unwanted) cache, and its shard folder unless ``shards`` is False,
    out of the way; never delete.  The new name carries the time and a random part, so two
    moves in one second never overwrite each other."""
    moved = []
    for p in (target, target.with_name(target.name + ".shards")) if shards else (target,):
        if p.exists():
            moved.append(aside(p))
    return moved


def aside(p: Path) -> Path:
    """Rename one file or folder to ``NAME.damaged-TIME-RANDOM`` beside it (never onto another)."""
    import secrets
    import time

    while True:
        dest = p.with_name(f"{p.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
        if not dest.exists() and not dest.is_symlink():
            break
    os.rename(p, dest)
    return dest


def choose_cache(cache: str | Path | None, backbone: str | None, cache_dir: str | Path,
                 images=None) -> Path:
    """The cache a stage-two command works on, never a guess.

    ``cache`` if given; else the complete caches of ``backbone`` in ``cache_dir``: exactly one
    is taken; with ``images`` (a function of a cache's views that returns the SHA-256 of every
    image the user's data holds, :func:`covfeat.extraction.sources.content_hashes`), the one whose
    images are exactly those (by content); several are an error that lists them.

    Raises
    ------
    ConfigError, CacheError
    """
    from covfeat.core.errors import ConfigError

    if cache is not None:
        return Path(cache)
    if backbone is None:
        raise ConfigError("pass --cache FILE or --backbone NAME (with --data SRC when several caches of it exist).")
    found = complete_caches(cache_dir, backbone)
    if not found:
        raise CacheError(f"No complete cache of {backbone} in {cache_dir}; run `covfeat extract --backbone {backbone}` "
                         "first.")
    if images is not None:
        picked = []
        for p in found:
            fc = open_cache(p)
            views = tuple(fc.config.get("views", ("PA",)))
            if set(fc.manifest["sha256"]) == images(views):
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
    lines = [describe_cache(path), "config: " + json.dumps(fc.config, sort_keys=True),
             "versions: " + a.get("versions", "{}")]
    nd = json.loads(a.get("near_duplicates", '{"pairs": []}'))
    lines.append(f"near-duplicate pairs: {len(nd['pairs'])}")
    for i, j, d, c in nd["pairs"]:
        lines.append(f"  {fc.manifest['path'][i]} ~ {fc.manifest['path'][j]} ({d} bits, correlation {c})")
    lines.append(f"near-duplicates under both labels (left out of every split): {len(nd.get('conflicts', []))}")
    for g in nd.get("conflicts", []):
        lines.append("  " + " ~ ".join(f"{fc.manifest['path'][k]} (label {fc.manifest['label'][k]})" for k in g))
    for key, title in (("missing", "listed but missing"), ("broken_links", "broken links"),
                       ("not_images", "not opened (not an image file name, not a regular file, or over --max-file-mb)"),
                       ("conflicts", "conflicting labels"),
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


SLICES = "slices.json"  # in a shard folder: how many slices its --shard tasks cut it into (extraction.run)
LEFT_ALONE = "left alone: not covfeat's or not provably stale; delete it yourself if you know it is not needed"


class CleanReport:
    """What ``covfeat clean`` removed and what it kept, each with its reason."""

    def __init__(self):
        self.removed: list[Path] = []
        self.kept: list[tuple[Path, str]] = []

    def text(self) -> str:
        lines = [f"removed {p}" for p in self.removed] + [f"kept {p} ({why})" for p, why in self.kept]
        return "\n".join(lines + [f"{len(self.removed)} leftover(s) removed"])


def clean_cache_dir(cache_dir: str | Path) -> CleanReport:
    """Remove what covfeat left behind and provably no longer needs, by covfeat's own markers,
    never by name alone: temporary files and folders whose writer (host and pid in the name)
    is gone, claims no process holds, empty shard folders of caches never finished, and the
    lock files of caches that no longer exist (each removed while holding it).  A finished
    shard is work, not a leftover, even without an index (queued ``--shard`` tasks, a Ray run
    whose driver died, a local run between computing and merging): it is kept and listed, as
    are caches moved aside and anything covfeat cannot prove its own."""
    r = CleanReport()
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return r
    r.removed += remove_stale(cache_dir)
    for p in sorted(cache_dir.iterdir()):
        if ".damaged-" in p.name:
            r.kept.append((p, "moved aside by --rebuild; delete it yourself when you no longer need it"))
        elif p.name.endswith(".shards") and p.is_dir() and not p.is_symlink():
            _clean_shards(p, r)
        elif p.name.endswith((".partial", ".h5.tmp")):  # unfinished files of earlier covfeat versions, or not covfeat's
            r.kept.append((p, LEFT_ALONE))
    for lock in sorted(cache_dir.glob("*.h5.lock")):
        target = lock.with_name(lock.name[:-len(".lock")])
        if not target.exists() and not target.with_name(target.name + ".shards").exists() and _covfeat_lock(lock):
            _remove_locked(target, lock, r)
    return r


def _covfeat_lock(lock: Path) -> bool:
    """A lock file covfeat wrote: a regular file, empty or holding "host pid"."""
    if lock.is_symlink() or not lock.is_file() or lock.stat().st_size > 200:
        return False
    text = lock.read_text(errors="replace").split()
    return not text or len(text) == 2 and text[1].isdigit() or len(text) == 1 and text[0].isdigit()


def _remove_locked(target: Path, remove: Path, r: CleanReport) -> None:
    """Remove ``remove`` (an empty shard folder or a lock file) holding the cache's lock, and
    the lock file with it; a busy lock keeps both."""
    lock = CacheLock(target)
    try:
        lock.__enter__()
    except CacheLocked as exc:
        r.kept.append((remove, f"in use: {exc}"))
        return
    gone = [target.with_name(target.name + ".lock")]
    try:
        if remove.is_dir():
            (remove / SLICES).unlink(missing_ok=True)
            os.rmdir(remove)  # only if still empty
            gone.insert(0, remove)
    except OSError:
        lock.release()
        r.kept.append((remove, "no longer empty: another run is adding shards to it"))
        return
    lock.release(remove=True)
    r.removed += gone


def _clean_shards(folder: Path, r: CleanReport) -> None:
    from covfeat.store.lock import Busy, FileLock

    r.removed += remove_stale(folder)
    for claim in sorted(folder.glob(".*.claim")):
        lock = FileLock(claim)
        try:
            lock.acquire()
        except (Busy, CacheError):
            continue  # held: its run is computing that shard
        lock.release(remove=True)
        r.removed.append(claim)
    target = folder.with_name(folder.name[:-len(".shards")])
    if target.exists():
        return  # a cache's own shards (not listed: a cache of 10^6 images has 31,250)
    entries = [p for p in folder.iterdir() if p.name != SLICES]
    if not entries:
        _remove_locked(target, folder, r)
        return
    mine = [p for p in entries if p.name.startswith("shard-") and p.name.endswith(".h5") and _shard_of(p, target)]
    if mine:
        r.kept.append((folder, f"{len(mine)} finished shard(s) of an extraction whose index is not written yet "
                               "(queued --shard tasks, a Ray run or an interrupted run may still add to it): run the "
                               "same `covfeat extract` to finish it, or delete it yourself if you do not want it"))
    else:
        r.kept.append((folder, LEFT_ALONE))


def _shard_of(shard: Path, target: Path) -> bool:
    """A shard file covfeat wrote for ``target``: its ``key`` is the key the cache's name holds."""
    key = key_in_name(target)
    try:
        with h5py.File(shard, "r") as h:
            return key is not None and h.attrs.get("key") == key
    except OSError:
        return False
