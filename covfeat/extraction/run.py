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

import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from covfeat.core.errors import CacheLocked, DataError
from covfeat.extraction.config import DriverConfig, ExtractConfig
from covfeat.extraction.plan import Plan, log, plan
from covfeat.extraction.sources import LABEL_NAMES
from covfeat.extraction.work import ShardComputer, compute_shard, decode_job
from covfeat.imaging.decode import INPUT_SIZE, UnreadableImage
from covfeat.store.catalog import move_aside, verify_cache
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
            progress: bool = True, rebuild: bool = False, driver: DriverConfig | None = None) -> Path | None:
    """Extract (or resume, or reuse) the feature cache for ``sources`` and return its path.

    The work is a set of immutable shards (:class:`covfeat.store.shards.ShardSpec`); a run computes
    only the shards that are missing, whichever driver made the others (``driver``: the
    local pipeline, Ray, or one slice ``--shard i/N`` of them), and the index over them is
    written once every shard is present and verified.  With ``--shard`` the return value is
    None while other slices are still missing.

    A cache already at the target is verified (every checksum) before it is reused; a damaged
    one is an error that names ``--rebuild``, which moves it (and its shards) aside.

    Raises
    ------
    WeightsUnavailable, SourceNotFound, DataError, ConfigError, CacheLocked, CacheError
    """
    driver = driver or DriverConfig()
    p = plan(sources, cfg, cache_dir)  # the backbone, weights and input pipeline, resolved once, for every driver
    target = p.target
    if rebuild:
        with CacheLock(target):
            for m in move_aside(target):
                log(f"Moved aside: {m}")
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
    todo = store.missing(p.shards)
    if driver.shard is not None:
        i, n_slices = driver.shard
        todo = [s for s in todo if s.index % n_slices == i]
    done = len(p.shards) - len(store.missing(p.shards))
    if done:
        log(f"Resuming: {done} of {len(p.shards)} shards already extracted; computing {len(todo)}.")
    timings = {}
    if todo:
        _probe_classes(p)
        if driver.engine == "ray":
            from covfeat.extraction.ray_driver import run_ray

            with CacheLock(target, shared=True):  # adds shards beside others; clean and --rebuild wait
                timings = run_ray(todo, p, driver, progress)
        elif driver.shard is None:
            with CacheLock(target):  # one local driver per cache: a second would only repeat the work
                timings = _run(todo, p, store, progress)
        else:
            with CacheLock(target, shared=True):
                timings = _run(todo, p, store, progress)
    still = store.missing(p.shards)
    if still:
        log(f"{len(p.shards) - len(still)} of {len(p.shards)} shards present; the index is written when all are "
             "(run the same command without --shard, or let the other slices finish).")
        return None
    try:
        with CacheLock(target):
            if not target.exists():
                _merge(p, store, timings)
    except CacheLocked:
        if driver.shard is None:
            raise
        log("Another process holds this cache (computing shards or writing the index); the index is written by "
             "the last one to finish, or by a run without --shard.")
        return None
    if not p.weights.pretrained:
        log("NOTE: features come from a NOT PRETRAINED (random-init) backbone; they say nothing about ImageNet transfer.")
    return target


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
            "forward_passes": computer.n_fwd, "forward_s": computer.t_fwd, "waiting_for_decode_s": t_wait}
