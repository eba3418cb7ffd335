"""Stage one's entry point, :func:`extract`, and its local driver: run one frozen backbone once
over the radiographs and cache its feature maps.

Order of work, chosen so that a user's mistake costs seconds, not hours:
config validated -> weights resolved -> sources read and hashed -> classes checked ->
cache key computed -> (complete cache? done) -> lock -> one readable image per class
confirmed -> model built -> a worker pool decodes, resizes and jitters each image once
while the main thread runs the forward pass -> shards written as it goes -> HDF5
assembled.  No split is made here: it is a stage-two setting of ``fit-head``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from covfeat.core.errors import CacheError, CacheLocked, ConfigError, DataError
from covfeat.core.fsutil import HOST, atomic_file
from covfeat.extraction.config import DriverConfig, ExtractConfig
from covfeat.extraction.plan import Plan, log, plan
from covfeat.extraction.sources import LABEL_NAMES
from covfeat.extraction.work import ShardComputer, compute_shard, decode_job
from covfeat.imaging.decode import INPUT_SIZE, UnreadableImage
from covfeat.store.catalog import SLICES, aside, move_aside, verify_cache
from covfeat.store.claims import Claims, wait_for
from covfeat.store.index import assemble, indexed_shards, recorded_versions
from covfeat.store.key import library_versions, version_difference
from covfeat.store.lock import CacheLock
from covfeat.store.shards import SHARD_IMAGES, ShardSpec, ShardStore, common_versions, shard_fingerprints, shard_skips
from covfeat.trust.neardup import MAX_BITS, MIN_CORR, describe, find_pairs, label_conflicts

BUILD_LOOKAHEAD_BYTES = 512 * 2**20  # decoded model inputs held while the model builds (augment 4: 178 images)


def _probe_classes(p: Plan) -> None:
    """Find one readable image per class before any model is built."""
    for label, name in LABEL_NAMES.items():
        reasons = []
        for r in (r for r in p.manifest.records if r.label == label):
            try:
                p.pipeline.decode(r.path)
                break
            except UnreadableImage as exc:
                reasons.append(str(exc))
        else:
            raise DataError(
                f"No readable {name} image: all {len(reasons)} failed to decode "
                f"(first reason: {reasons[0] if reasons else 'none listed'})."
            )


def extract(sources: list[str | Path] | None, cfg: ExtractConfig, cache_dir: str | Path = "cache",
            progress: bool = True, rebuild: bool | str | None = False,
            driver: DriverConfig | None = None) -> Path | None:
    """Extract (or resume, or reuse) the feature cache for ``sources`` and return its path.

    The work is a set of immutable shards (:class:`covfeat.store.shards.ShardSpec`); a run computes
    only the shards that are missing, whichever driver made the others (``driver``: the
    local pipeline, Ray, or one slice ``--shard i/N`` of them), and the index over them is
    written once every shard is present and verified.  With ``--shard`` the return value is
    None while other slices are still missing.

    Runs of one cache may work at once: each holds the cache's lock shared and claims the
    shards it computes (:mod:`covfeat.store.claims`), so a second run computes only what is
    unclaimed and names what it left to the other.  A run without ``--shard`` then waits for
    the other's shards (computing those whose run died) and for its index; a ``--shard`` slice
    leaves them, and the index, to the other.  The local driver used to hold the lock alone;
    with claims that is needless, and a second run no longer fails or repeats the work.

    A cache already at the target is verified (every checksum) before it is reused; a damaged
    one is an error that names ``--rebuild``.  ``rebuild`` (True or "damaged") moves aside the
    shards that fail verification (with ``--shard``, only the slice's own) and the index, then
    recomputes those shards and rewrites the index; "all" moves the whole cache aside.

    Raises
    ------
    WeightsUnavailable, SourceNotFound, DataError, ConfigError, CacheLocked, CacheError
    """
    driver = driver or DriverConfig()
    mode = rebuild_mode(rebuild, driver)
    p = plan(sources, cfg, cache_dir)  # the backbone, weights and input pipeline, resolved once, for every driver
    target = p.target
    if mode:
        _rebuild(p, mode, driver)
    elif target.exists():
        if not indexed_shards(target):  # an index of an earlier covfeat: re-indexed from its verified shards
            with CacheLock(target):
                log(f"Re-indexing {target} (written by an earlier covfeat, without the record of its shards); "
                    "no feature is computed.")
                _merge(p, ShardStore(target, p.key), {}, reindex=True)
        verify_cache(target)  # raises, naming --rebuild, if anything is damaged
        log(f"Cache is complete and verified; nothing to do ({p.weights.label}).")
        made = recorded_versions(target)
        if made != library_versions():  # the user's numbers are kept, but not silently
            log(f"NOTE: this cache was made with other library versions than this covfeat's "
                f"({version_difference(made, library_versions())}); its features are reused as they are. Run the "
                "same `covfeat extract` with --rebuild all to recompute them with these versions.")
        return target

    store = ShardStore(target, p.key)
    store.remove_stale_tmp()
    if driver.shard is not None:
        _check_slices(store, driver.shard[1])
    todo = store.missing(_own(p.shards, driver))
    done = len(p.shards) - len(store.missing(p.shards))
    if done:
        log(f"Resuming: {done} of {len(p.shards)} shards already extracted; computing {len(todo)}.")
    timings = _compute(todo, p, store, driver, progress) if todo else {}
    still = store.missing(p.shards)
    if still:
        log(f"{len(p.shards) - len(still)} of {len(p.shards)} shards present; the index is written when all are "
             "(run the same command without --shard, or let the other slices finish).")
        return None
    try:
        lock = CacheLock(target)
        try:
            lock.__enter__()
        except CacheLocked:
            if driver.shard is not None:
                raise
            log(f"Another covfeat process holds {target.name} (writing its index, or adding shards); waiting for it.")
            lock = CacheLock(target, wait=True).__enter__()
    except CacheLocked:
        log("Another process holds this cache (computing shards or writing the index); the index is written by "
             "the last one to finish, or by a run without --shard.")
        return None
    try:
        if not target.exists():
            _merge(p, store, timings)
    finally:
        lock.release()
    if not p.weights.pretrained:
        log("NOTE: features come from a NOT PRETRAINED (random-init) backbone; they say nothing about ImageNet transfer.")
    return target


def rebuild_mode(rebuild: bool | str | None, driver: DriverConfig) -> str | None:
    """None, "damaged" or "all" from ``rebuild`` (True is "damaged"); "all" with ``--shard`` is refused."""
    mode = "damaged" if rebuild is True else None if rebuild in (False, None) else rebuild
    if mode not in (None, "damaged", "all"):
        raise ConfigError(f"--rebuild: expected nothing, 'damaged' or 'all', got {rebuild!r}.")
    if mode == "all" and driver.shard is not None:
        raise ConfigError("--rebuild all cannot go with --shard i/N: each array task would move the others' shards "
                          "aside. Run `covfeat extract --rebuild all` once without --shard, or --rebuild alone (it "
                          "redoes only the damaged shards of this slice).")
    return mode


def _own(specs: list[ShardSpec], driver: DriverConfig) -> list[ShardSpec]:
    """The shards this run computes: all, or its slice's with ``--shard i/N``."""
    if driver.shard is None:
        return list(specs)
    i, n_slices = driver.shard
    return [s for s in specs if s.index % n_slices == i]


SLICES_RECENT_S = 6 * 3600


def _check_slices(store: ShardStore, n_slices: int) -> None:
    """Record that ``--shard i/N`` tasks work on this cache, and warn when another cache of the
    same backbone and weights got slices of the same N in the last hours: the tasks of one
    array job that see different data (a file changed between their plans, a node that sees
    another copy) plan different caches, each of which waits forever for its other slices."""
    prefix = store.target.name.rsplit("-", 1)[0]
    now = time.time()
    for other in sorted(store.target.parent.glob(f"{prefix}-*.h5.shards/{SLICES}")):
        if other.parent == store.dir:
            continue
        try:
            rec = json.loads(other.read_text())
            recent = now - other.stat().st_mtime < SLICES_RECENT_S
        except (OSError, ValueError):
            continue
        if recent and rec.get("n") == n_slices:
            log(f"WARNING: another cache of {prefix} got --shard slices of {n_slices} in the last hours: "
                f"{other.parent.name[:-len('.shards')]} ({time.ctime(other.stat().st_mtime)}, {rec.get('host')}), "
                f"this one is {store.target.name}. If they are one array job, its tasks saw different data (a file "
                "changed, or a node sees another copy) and neither cache will be complete; check with `covfeat info` "
                "once one is, and make every task see the same files.")
    with atomic_file(store.dir / SLICES) as tmp:
        tmp.write_text(json.dumps({"n": n_slices, "host": HOST}))


def _rebuild(p: Plan, mode: str, driver: DriverConfig) -> None:
    """Move aside what --rebuild redoes: the whole cache ("all"), or the shards (this slice's,
    with --shard) that fail verification, and the index ("damaged").  Nothing is deleted."""
    target = p.target
    with CacheLock(target, shared=driver.shard is not None):  # slices touch only their own shards; claims below
        if mode == "all":
            for m in move_aside(target):
                log(f"Moved aside: {m}")
            return
        store = ShardStore(target, p.key)
        with Claims() as claims:
            specs = store.present(_own(p.shards, driver))
            mine, others = claims.take([store.path(s) for s in specs])
            if others:
                raise CacheLocked(f"Another covfeat run ({next(iter(others.values()))}) is computing shards of "
                                  f"{target.name}; let it finish, then run --rebuild again.")
            for spec in specs:
                try:
                    store.verify(spec, p.rows)
                except CacheError as exc:
                    log(f"Moved aside: {aside(store.path(spec))} (a damaged shard, computed again: {exc})")
        for m in move_aside(target, shards=False):
            log(f"Moved aside: {m} (the index, written again)")


def _compute(todo: list[ShardSpec], p: Plan, store: ShardStore, driver: DriverConfig, progress: bool) -> dict:
    """Compute the shards of ``todo`` that no other run claims; without ``--shard``, then wait
    for those others and compute any their run left undone.  Returns timings, summed."""
    timings: dict = {}
    probed = False
    with CacheLock(p.target, shared=True):  # beside other shard writers; clean and --rebuild wait
        while True:
            todo = store.missing(todo)
            if not todo:
                return timings
            with Claims() as claims:
                spec_of = {store.path(s): s for s in todo}
                mine, others = claims.take(list(spec_of))
                if others:
                    log(f"{len(others)} shard(s) are being computed by another run ({next(iter(others.values()))}); "
                        f"left to it: {', '.join(x.name for x in others)}")
                if mine:
                    if not probed:
                        _probe_classes(p)
                        probed = True
                    got = _drive([spec_of[x] for x in mine], p, store, driver, progress)
                    timings = {k: timings[k] + v if isinstance(v, (int, float)) and k in timings else v
                               for k, v in got.items()}
            if driver.shard is not None or not others:
                return timings
            log("Waiting for the other run's shards (any it leaves undone are computed here).")
            for x in others:
                wait_for(x)


def _drive(specs: list[ShardSpec], p: Plan, store: ShardStore, driver: DriverConfig, progress: bool) -> dict:
    if driver.engine == "ray":
        from covfeat.extraction.ray_driver import run_ray

        return run_ray(specs, p, driver, progress)
    return _run(specs, p, store, progress)


def _merge(p: Plan, store: ShardStore, timings: dict, reindex: bool = False) -> None:
    """The index over the shards: every shard verified, near-duplicates found, skips listed.

    Shards of different library versions are refused (naming one of each); a shard of other
    versions than this process's counts as damaged, unless ``reindex`` (the finished cache of an
    earlier covfeat, whose shards keep the versions they record, or none)."""
    rows, manifest, target = p.rows, p.manifest, p.target
    versions = common_versions(store, p.shards)
    for spec in p.shards:  # every shard whole before anything is read from it
        store.verify(spec, rows, versions if reindex else None)
    skipped = shard_skips(store, p.shards)
    if skipped:
        log(f"Skipped {len(skipped)} unreadable file(s):")
        for k in sorted(skipped)[:10]:
            log(f"  {rows[k]['path']}: {skipped[k]}")
        if len(skipped) > 10:
            log(f"  ... and {len(skipped) - 10} more; `covfeat info {target}` lists every one with its reason")
    near = near_duplicates(store, p.shards, rows)
    _label_conflicts(near, rows, p.cfg.on_conflict)
    extra = {"near_duplicates": near, "missing": [list(m) for m in manifest.missing],
             "duplicates": [list(d) for d in manifest.duplicates],
             "broken_links": [list(b) for b in manifest.broken_links],
             "not_images": [list(b) for b in manifest.not_images],
             "conflicts": [list(c) for c in manifest.conflicts], "outside_manifest_folder": manifest.outside,
             "ignored": manifest.ignored, "weights_label": p.weights.label, "weights_path": p.weights.path or "",
             "timings": timings}
    assemble(target, store, p.shards, config=p.config, manifest=rows, feature_shape=p.backbone.feature_shape,
             dtype=p.cfg.dtype, extra=extra, verified=True)


def near_duplicates(store: ShardStore, specs, rows: list[dict]) -> dict:
    """Near-duplicate pairs among the extracted images, logged and kept in the cache."""
    hashes, thumbs = shard_fingerprints(store, specs, len(rows))
    pairs = find_pairs(hashes, thumbs)
    paths = [r["path"] for r in rows]
    patients = [r["patient_id"] for r in rows]
    cross = sum(1 for i, j, *_ in pairs if patients[i] != patients[j])
    if pairs:
        log(f"Near-duplicates: {len(pairs)} pair(s) of images, {cross} of them under two patient IDs "
             f"(fit-head keeps each pair on one side of every split):")
        for line in describe(pairs, paths, patients):
            log(line)
    return {"max_bits": MAX_BITS, "min_corr": MIN_CORR,
            "pairs": [[int(i), int(j), int(d), round(float(c), 4)] for i, j, d, c in pairs]}


def _label_conflicts(near: dict, rows: list[dict], on_conflict: str) -> None:
    """Copies of one radiograph under both labels: an error naming them, as for the same bytes
    under two labels (the shards are kept, so the rerun only writes the index), or with
    ``--on-conflict skip`` recorded in ``near["conflicts"]``, whose images fit-head leaves out
    of every split."""
    groups = label_conflicts(near["pairs"], [r["label"] for r in rows])
    near["conflicts"] = groups
    if not groups:
        return
    described = [" ~ ".join(f"{rows[k]['path']} ({LABEL_NAMES[int(rows[k]['label'])]})" for k in g) for g in groups]
    if on_conflict != "skip":
        more = f" and {len(described) - 3} more" if len(described) > 3 else ""
        raise DataError(f"{len(described)} radiograph(s) appear as near-duplicates under both labels: "
                        f"{'; '.join(described[:3])}{more}. Fix the labels, or pass --on-conflict skip to leave every "
                        "copy out of every split (the extracted shards are kept).")
    log(f"Near-duplicates under both labels, left out of every split ({len(groups)} radiograph(s)):")
    for line in described[:10]:
        log(f"  {line}")


def _lower_priority() -> None:
    """Decoding runs ahead with slack; at a lower priority it fills idle cycles instead of
    preempting the forward pass (Linux gives each thread its own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _run(todo: list[ShardSpec], p: Plan, store: ShardStore, progress: bool) -> dict:
    """The local driver: decode in a worker pool a shard ahead, forward on the main thread,
    write each shard file off-thread; the same per-shard computation as every other driver."""
    from tqdm import tqdm

    rows, cfg, pipeline = p.rows, p.cfg, p.pipeline
    n_views = cfg.augment + 1
    order = [(s, i) for s in todo for i in s.rows]  # images in shard order
    pool = ThreadPoolExecutor(max_workers=cfg.workers, initializer=_lower_priority)
    writer = ThreadPoolExecutor(max_workers=1)  # shard files are written and fsynced off the main thread
    pending = deque()
    nxt = 0
    # Decode the whole next shard while this one runs through the model, so the forward
    # pass never waits at a shard boundary.  The model build (seconds, on one core) leaves the
    # other core idle: it decodes ahead as far as BUILD_LOOKAHEAD_BYTES of model inputs allow,
    # work the forward pass would otherwise share its cores with.
    lookahead = 2 * SHARD_IMAGES
    per_image = n_views * INPUT_SIZE * INPUT_SIZE * 3 * 4
    t_start = time.perf_counter()

    def fill(limit=lookahead):
        nonlocal nxt
        while nxt < len(order) and len(pending) < limit:
            i = order[nxt][1]
            pending.append(pool.submit(decode_job, rows[i]["path"], rows[i]["sha256"], cfg, pipeline))
            nxt += 1

    bar = None
    t_wait = 0.0
    written = None
    try:
        fill(max(lookahead, BUILD_LOOKAHEAD_BYTES // per_image))
        t0 = time.perf_counter()
        computer = ShardComputer(cfg, p.backbone, p.weights)  # inside the try: a failed build cancels the decoding
        t_built = time.perf_counter()
        bar = tqdm(total=len(order) * n_views, unit="img", desc=f"extract {cfg.backbone}",
                   disable=not progress, file=sys.stderr, smoothing=0.1)
        for spec in todo:
            results = []
            for _ in spec.rows:
                fill()
                tw0 = time.perf_counter()
                res = pending.popleft().result()
                t_wait += time.perf_counter() - tw0
                if isinstance(res, str):
                    bar.update(n_views)
                results.append(res)
            shard = compute_shard(spec, rows, cfg, pipeline, computer, decoded=results, on_batch=bar.update)
            if written is not None:
                written.result()  # one shard in flight at most
            written = writer.submit(store.write, spec, *shard)
        if written is not None:
            written.result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a shard being written is finished, never left half-done
        if bar is not None:
            bar.close()
    t_end = time.perf_counter()
    # pipeline_s: all the time the work took except the model build, as if decoding had not
    # overlapped the build at all (so a benchmark on few images cannot hide the decoding).
    return {"build_model_s": t_built - t0, "pipeline_s": (t_end - t_start) - (t_built - t0),
            "forward_passes": computer.n_fwd, "forward_s": computer.t_fwd, "waiting_for_decode_s": t_wait,
            "threads_per_operation": computer.threads}
