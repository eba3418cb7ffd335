"""The caches of a folder: choose one, describe it, verify it, move it aside, clean leftovers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py

from covfeat.core.errors import CacheError, CacheLocked
from covfeat.core.fsutil import remove_stale
from covfeat.store.index import damaged
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
    """Remove shard folders of caches no live process is writing (the lock tells), and the
    temporary files of indexes and shards whose writer is gone (:func:`remove_stale`);
    return (removed, moved-aside caches left for the user)."""
    removed, kept = [], []
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return removed, kept
    removed += remove_stale(cache_dir)
    for p in sorted(cache_dir.iterdir()):
        if ".damaged-" in p.name:
            kept.append(p)
            continue
        # (.partial and .h5.tmp: the unfinished files of earlier covfeat versions)
        if p.name.endswith(".shards") and not p.with_name(p.name[:-len(".shards")]).exists() \
                or p.name.endswith(".partial") or p.name.endswith(".h5.tmp"):
            target = p.with_name(p.name.rsplit(".", 1)[0])
            try:
                with CacheLock(target):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
            except CacheLocked:
                continue
    for shards in sorted(cache_dir.glob("*.shards")):
        removed += remove_stale(shards)
    return removed, kept
