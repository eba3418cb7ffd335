"""Stage one: run one frozen backbone once over the radiographs and cache its feature maps.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backbones import INPUT_SIZE, get_backbone, resolve_weights
from .cache import (SHARD_IMAGES, CacheLock, ShardSpec, ShardStore, assemble, cache_key, cache_name, move_aside,
                    plan_shards, shard_fingerprints, shard_skips, verify_cache)
from .config import DriverConfig, ExtractConfig, key_config
from .errors import CacheLocked, ConfigError, DataError, FileUnavailable
from .graphfile import backbone_forward, discard
from .images import SCALED_DECODE_MIN_SIDE, InputPipeline, UnreadableImage, apply_view, occlude, view_params
from .neardup import MAX_BITS, MIN_CORR, describe, find_pairs, fingerprint
from .sources import LABEL_NAMES, Manifest, load_sources

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
STREAMS = 2  # batches in the model at once (ShardComputer.features)
BUILD_LOOKAHEAD_BYTES = 512 * 2**20  # decoded model inputs held while the model builds (augment 4: 178 images)


def sample_sources() -> list[Path]:
    """The bundled sample: a few dozen downscaled radiographs per class (see NOTICE)."""
    return [SAMPLE_DIR / "cohen", SAMPLE_DIR / "kermany" / "NORMAL"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_image(path: str, sha256: str, cfg: ExtractConfig, pipeline: InputPipeline):
    """Decode one file once and return its model inputs for every view, their jitter, and
    its near-duplicate fingerprint (of the image before any occlusion).

    Returns
    -------
    inputs : (augment + 1, 224, 224, 3) float32, view 0 the original
    params : (augment + 1, 4) float32, (angle, tx, ty, zoom); zeros for view 0
    fingerprint : (hashes, thumbnails), see :mod:`covfeat.neardup`
    """
    raw = pipeline.decode(path, occluded=False)
    fp = fingerprint(raw)
    base = occlude(raw, path, pipeline.occlusion)
    inputs = np.empty((cfg.augment + 1, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    params = np.zeros((cfg.augment + 1, 4), np.float32)
    pipeline.scale(base, out=inputs[0])
    for v in range(1, cfg.augment + 1):
        params[v] = view_params(sha256, v, cfg.seed, cfg.jitter)
        pipeline.scale(apply_view(base, params[v]), out=inputs[v])
    return inputs, params, fp


def resolved_config(cfg: ExtractConfig, spec) -> dict:
    """What the cache records of its config: the key fields, the weights, and fixed facts."""
    out = key_config(cfg, spec.identity)
    out["weights"] = {"identity": spec.identity, "kind": spec.kind, "pretrained": spec.pretrained, "label": spec.label}
    out.update(
        input_size=INPUT_SIZE,
        resize="cv2.INTER_AREA (shrink) / INTER_LINEAR (enlarge)",
        decode=(f"JPEG scaled in the DCT domain to >= {SCALED_DECODE_MIN_SIDE} px when larger"
                if cfg.scaled_decode else "full size"),
        augment_scope="all rows (evaluation uses view 0 only)",
    )
    return out


def _check_classes(manifest: Manifest) -> None:
    counts = manifest.counts()
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"No {' or '.join(empty)} images in the given data ({manifest.summary()}); "
            "covfeat needs both COVID-19 and NORMAL images."
        )


def _probe_classes(records, pipeline: InputPipeline) -> None:
    """Find one readable image per class before any model is built."""
    for label, name in LABEL_NAMES.items():
        reasons = []
        for r in (r for r in records if r.label == label):
            try:
                pipeline.decode(r.path)
                break
            except UnreadableImage as exc:
                reasons.append(str(exc))
        else:
            raise DataError(
                f"No readable {name} image: all {len(reasons)} failed to decode "
                f"(first reason: {reasons[0] if reasons else 'none listed'})."
            )


@dataclass
class Plan:
    """What an extraction will produce, known before any image is decoded or model built."""

    target: Path
    manifest: Manifest
    config: dict
    rows: list[dict]
    spec: object  # the resolved weights
    key: str
    shards: list[ShardSpec]


def plan(sources: list[str | Path] | None, cfg: ExtractConfig, cache_dir: str | Path = "cache") -> Plan:
    """Resolve weights, read and hash the sources, check both classes, name the cache and its shards.

    Raises
    ------
    WeightsUnavailable, SourceNotFound, DataError, ConfigError
    """
    cfg.validate()
    backbone = get_backbone(cfg.backbone)
    spec = resolve_weights(backbone, cfg.weights, seed=cfg.seed)
    if not sources:
        sources = sample_sources()
        _log(f"No --data given: using the bundled sample in {SAMPLE_DIR}")
    manifest = load_sources(sources, views=cfg.views, on_conflict=cfg.on_conflict)
    _log(f"Data: {manifest.summary()}")
    for what, items in (("missing", manifest.missing), ("broken link", manifest.broken_links),
                        ("not opened", manifest.not_images), ("conflicting label", manifest.conflicts)):
        for path, reason in items[:3]:
            _log(f"  {what}: {path} ({reason})")
        if len(items) > 3:
            _log(f"  ... and {len(items) - 3} more ({what}); `covfeat info CACHE` lists every one")
    _check_classes(manifest)
    config = resolved_config(cfg, spec)
    rows = [{"path": r.path, "label": r.label, "patient_id": r.patient_id, "source": r.source,
             "view": r.view, "sha256": r.sha256} for r in manifest.records]
    key_rows = [{k: v for k, v in r.items() if k != "path"} for r in rows]
    key = cache_key(key_config(cfg, spec.identity), key_rows)
    target = Path(cache_dir) / cache_name(cfg.backbone, spec.kind, key)
    return Plan(target, manifest, config, rows, spec, key, plan_shards(rows, key))


def extract(sources: list[str | Path] | None, cfg: ExtractConfig, cache_dir: str | Path = "cache",
            progress: bool = True, rebuild: bool = False, driver: DriverConfig | None = None) -> Path | None:
    """Extract (or resume, or reuse) the feature cache for ``sources`` and return its path.

    The work is a set of immutable shards (:class:`covfeat.cache.ShardSpec`); a run computes
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
    p = plan(sources, cfg, cache_dir)
    target, manifest = p.target, p.manifest
    backbone = get_backbone(cfg.backbone)
    pipeline = cfg.pipeline()
    if rebuild:
        with CacheLock(target):
            for m in move_aside(target):
                _log(f"Moved aside: {m}")
    elif target.exists():
        verify_cache(target)  # raises, naming --rebuild, if anything is damaged
        _log(f"Cache is complete and verified; nothing to do ({p.spec.label}).")
        return target

    store = ShardStore(target, p.key)
    store.remove_stale_tmp()
    todo = store.missing(p.shards)
    if driver.shard is not None:
        i, n_slices = driver.shard
        todo = [s for s in todo if s.index % n_slices == i]
    done = len(p.shards) - len(store.missing(p.shards))
    if done:
        _log(f"Resuming: {done} of {len(p.shards)} shards already extracted; computing {len(todo)}.")
    timings = {}
    if todo:
        _probe_classes(manifest.records, pipeline)
        if driver.engine == "ray":
            from .distributed import run_ray

            with CacheLock(target, shared=True):  # adds shards beside others; clean and --rebuild wait
                timings = run_ray(todo, p, cfg, driver, progress)
        elif driver.shard is None:
            with CacheLock(target):  # one local driver per cache: a second would only repeat the work
                timings = _run(todo, p, cfg, backbone, store, progress, pipeline)
        else:
            with CacheLock(target, shared=True):
                timings = _run(todo, p, cfg, backbone, store, progress, pipeline)
    still = store.missing(p.shards)
    if still:
        _log(f"{len(p.shards) - len(still)} of {len(p.shards)} shards present; the index is written when all are "
             "(run the same command without --shard, or let the other slices finish).")
        return None
    try:
        with CacheLock(target):
            if not target.exists():
                _merge(p, cfg, backbone, store, timings)
    except CacheLocked:
        if driver.shard is None:
            raise
        _log("Another process holds this cache (computing shards or writing the index); the index is written by "
             "the last one to finish, or by a run without --shard.")
        return None
    if not p.spec.pretrained:
        _log("NOTE: features come from a NOT PRETRAINED (random-init) backbone; they say nothing about ImageNet transfer.")
    return target


def _merge(p: Plan, cfg: ExtractConfig, backbone, store: ShardStore, timings: dict) -> None:
    """The index over the shards: every shard verified, near-duplicates found, skips listed."""
    rows, manifest, target = p.rows, p.manifest, p.target
    for spec in p.shards:  # every shard whole before anything is read from it
        store.verify(spec, rows)
    skipped = shard_skips(store, p.shards)
    if skipped:
        _log(f"Skipped {len(skipped)} unreadable file(s):")
        for k in sorted(skipped)[:10]:
            _log(f"  {rows[k]['path']}: {skipped[k]}")
        if len(skipped) > 10:
            _log(f"  ... and {len(skipped) - 10} more; `covfeat info {target}` lists every one with its reason")
    near = near_duplicates(store, p.shards, rows)
    extra = {"near_duplicates": near, "missing": [list(m) for m in manifest.missing],
             "duplicates": [list(d) for d in manifest.duplicates],
             "broken_links": [list(b) for b in manifest.broken_links],
             "not_images": [list(b) for b in manifest.not_images],
             "conflicts": [list(c) for c in manifest.conflicts], "outside_manifest_folder": manifest.outside,
             "ignored": manifest.ignored, "weights_label": p.spec.label, "weights_path": p.spec.path or "",
             "timings": timings}
    assemble(target, store, p.shards, config=p.config, manifest=rows, feature_shape=backbone.feature_shape,
             dtype=cfg.dtype, extra=extra, verified=True)


def near_duplicates(store: ShardStore, specs, rows: list[dict]) -> dict:
    """Near-duplicate pairs among the extracted images, logged and kept in the cache."""
    hashes, thumbs = shard_fingerprints(store, specs, len(rows))
    pairs = find_pairs(hashes, thumbs)
    paths = [r["path"] for r in rows]
    patients = [r["patient_id"] for r in rows]
    cross = sum(1 for i, j, *_ in pairs if patients[i] != patients[j])
    if pairs:
        _log(f"Near-duplicates: {len(pairs)} pair(s) of images, {cross} of them under two patient IDs "
             f"(fit-head keeps each pair on one side of every split):")
        for line in describe(pairs, paths, patients):
            _log(line)
    return {"max_bits": MAX_BITS, "min_corr": MIN_CORR,
            "pairs": [[int(i), int(j), int(d), round(float(c), 4)] for i, j, d, c in pairs]}


def _lower_priority() -> None:
    """Decoding runs ahead with slack; at a lower priority it fills idle cycles instead of
    preempting the forward pass (Linux gives each thread its own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def decode_job(path: str, sha256: str, cfg: ExtractConfig, pipeline: InputPipeline):
    """prepare_image, with every failure turned into a skip reason (a string)."""
    try:
        return prepare_image(path, sha256, cfg, pipeline)
    except UnreadableImage as exc:
        return str(exc)
    except FileUnavailable:
        raise  # not the image's fault: stop, and do not record a lasting skip
    except Exception as exc:  # an unexpected decoder failure is still a per-file skip
        return f"unreadable ({type(exc).__name__}: {exc})"


class ShardComputer:
    """The forward pass of one shard's decoded images, in batches formed within the shard, so
    every driver computes a shard's features identically."""

    def __init__(self, cfg: ExtractConfig, backbone, spec):
        from .quiet import import_tensorflow

        import_tensorflow()
        import tensorflow as tf

        self.cfg, self.backbone, self._tf = cfg, backbone, tf
        # One graph for any batch size (kept in covfeat's graph cache, see covfeat.graphfile),
        # instantiated here on a single image: a warm-up batch of batch_size images would cost
        # a whole batch's forward pass for nothing (1 s for densenet201 on 2 cores); the
        # features are the same, bit for bit (tests/test_extract.py).
        # Measured on CPUs only: on a GPU the optimiser's layout and fusion passes stay on.
        self._as_traced = not tf.config.list_logical_devices("GPU")
        self._forward = backbone_forward(backbone, spec, seed=cfg.seed)
        try:
            self.forward(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
        except (tf.errors.OpError, TypeError, ValueError) as exc:
            if self._forward.source != "cache":
                raise
            discard(self._forward, exc)  # a cached graph this TensorFlow cannot run: build it again
            self._forward = backbone_forward(backbone, spec, seed=cfg.seed)
            self.forward(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
        self.batches = [np.zeros((cfg.batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.float32) for _ in range(STREAMS)]
        self.t_fwd = 0.0
        self.n_fwd = 0

    @contextmanager
    def _graph_as_traced(self):
        """TensorFlow's graph optimiser (grappler) finds nothing to gain in these inference
        graphs on a CPU yet spends 0.3-1.0 s on each one when first called (densenet201 0.9 s,
        inception_resnet_v2 1.0 s); with it off the four backbones give the same features, bit
        for bit, at the same speed (measured; tests/test_extract.py holds the equality).  The
        option is process-wide in TensorFlow and part of every function call (each thread
        reads it when it first calls one), so it is set around the extraction's own calls, and
        their threads, only, and restored after (a thread of the caller's own that first calls a
        TensorFlow function inside the window would keep it off; covfeat has none)."""
        if not self._as_traced:
            yield
            return
        opts = self._tf.config.optimizer
        before = bool(opts.get_experimental_options().get("disable_meta_optimizer", False))
        opts.set_experimental_options({"disable_meta_optimizer": True})
        try:
            yield
        finally:
            opts.set_experimental_options({"disable_meta_optimizer": before})

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The backbone on one batch, its graph run as traced."""
        with self._graph_as_traced():
            return self._forward(batch).numpy()

    def features(self, results: list, on_batch=None):
        """(features, images, views, params, skipped, fingerprints) of one shard's decode results.

        Batches are formed in order within the shard, always batch_size rows (the rows after a
        short last batch are zeros), and STREAMS of them run through the model at once: on 2
        cores two concurrent batches keep both busy through the many small, memory-bound
        operations of a batch (densenet201's concatenations and batch norms) and hide the
        per-batch copying and checking; each batch's features are what it gives alone."""
        cfg, n_views, bs = self.cfg, self.cfg.augment + 1, self.cfg.batch_size
        inputs, images, views, params_v, skipped, fps = [], [], [], [], {}, {}
        for pos, res in enumerate(results):
            if isinstance(res, str):
                skipped[pos] = res
                continue
            inputs.append(res[0])
            params_v.append(res[1])
            fps[pos] = res[2]
            images += [pos] * n_views
            views += list(range(n_views))
        views_list = [v for arr in inputs for v in arr]  # views in order, no copy
        feats = np.empty((len(views_list), *self.backbone.feature_shape), np.dtype(cfg.dtype))

        def run(batch):
            return self._forward(batch).numpy()

        def collect(b0, k, future):
            out = future.result()[:k]
            with np.errstate(over="ignore"):  # values beyond float16 become inf, reported just below
                feats[b0:b0 + k] = out
            if not np.isfinite(feats[b0:b0 + k]).all():
                raise ConfigError(
                    f"{cfg.backbone} gave feature values that {cfg.dtype} cannot hold (largest "
                    f"{float(np.abs(out).max()):.3g}); extract again with --dtype float32."
                )
            self.n_fwd += k
            if on_batch:
                on_batch(k)

        tf0 = time.perf_counter()
        # New threads inside _graph_as_traced: each reads the optimiser option when it first calls.
        with self._graph_as_traced(), ThreadPoolExecutor(max_workers=STREAMS) as streams:
            in_flight = deque()
            try:
                for i, b0 in enumerate(range(0, len(views_list), bs)):
                    if len(in_flight) == STREAMS:  # its batch buffer is free once its batch is done
                        collect(*in_flight.popleft())
                    batch, k = self.batches[i % STREAMS], min(bs, len(views_list) - b0)
                    for j in range(k):
                        batch[j] = views_list[b0 + j]
                    batch[k:] = 0.0
                    in_flight.append((b0, k, streams.submit(run, batch)))
                while in_flight:
                    collect(*in_flight.popleft())
            finally:
                for _, _, f in in_flight:  # an error: let the other stream finish, not run on
                    f.cancel()
        self.t_fwd += time.perf_counter() - tf0
        params = np.concatenate(params_v) if params_v else np.empty((0, 4), np.float32)
        return feats, np.array(images, np.int32), np.array(views, np.int8), params, skipped, fps


def compute_shard(spec: ShardSpec, rows: list[dict], cfg: ExtractConfig, pipeline: InputPipeline,
                  computer: ShardComputer, decoded: list | None = None, on_batch=None) -> tuple:
    """Everything a shard file holds: its images decoded (unless ``decoded`` already holds
    their decode results, as the local driver's look-ahead has them) and run through the model."""
    if decoded is None:
        decoded = [decode_job(rows[i]["path"], rows[i]["sha256"], cfg, pipeline) for i in spec.rows]
    return ([rows[i]["sha256"] for i in spec.rows], *computer.features(decoded, on_batch=on_batch))


def extract_shard(spec: ShardSpec, rows: list[dict], cfg: ExtractConfig, pipeline: InputPipeline,
                  store: ShardStore, computer: ShardComputer) -> Path:
    """One shard, start to finish: decode its images, run the forward pass, write its file.
    A pure function of (images, config): a retry writes the same shard.  Every driver computes
    shards with compute_shard and writes them with ShardStore.write, as here."""
    return store.write(spec, *compute_shard(spec, rows, cfg, pipeline, computer))


def _run(todo: list[ShardSpec], p: Plan, cfg: ExtractConfig, backbone, store: ShardStore, progress: bool,
         pipeline: InputPipeline) -> dict:
    """The local driver: decode in a worker pool a shard ahead, forward on the main thread,
    write each shard file off-thread; the same per-shard computation as every other driver."""
    from tqdm import tqdm

    rows = p.rows
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
        computer = ShardComputer(cfg, backbone, p.spec)  # inside the try: a failed build cancels the decoding
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
