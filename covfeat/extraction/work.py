"""The per-shard work every driver shares: decode an image into its views, run a shard's
images through the backbone, write the shard."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError, FileChanged, FileUnavailable, OutOfMemory
from covfeat.extraction.backbones import Backbone, WeightsSpec
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.graphfile import backbone_forward, discard
from covfeat.extraction.images import InputPipeline, apply_view, view_params
from covfeat.extraction.precision import prepare_process, route_of
from covfeat.imaging.decode import INPUT_SIZE, UnreadableImage
from covfeat.store.shards import ShardSpec, ShardStore
from covfeat.trust.neardup import fingerprint

STREAMS = 2  # batches in the model at once (ShardComputer.features)

# True in processes that only extract (the extract command, Ray's workers): there each operation
# gets one thread (:func:`one_thread_per_stream`).  A library caller's process keeps TensorFlow's
# default, since what follows there (a Grad-CAM, a Keras fit) runs one stream.
OWN_PROCESS = False


def prepare_image(path: str, sha256: str, cfg: ExtractConfig, pipeline: InputPipeline):
    """Decode one file once and return its model inputs for every view, their jitter, and
    its near-duplicate fingerprint (of the whole image: before any occlusion, and before a
    lungs run restricts it to the lung fields, see :meth:`InputPipeline.prepare`).

    Returns
    -------
    inputs : (augment + 1, 224, 224, 3) float32, view 0 the original
    params : (augment + 1, 4) float32, (angle, tx, ty, zoom); zeros for view 0
    fingerprint : (hashes, thumbnails), see :mod:`covfeat.trust.neardup`
    """
    whole, base = pipeline.prepare(path, sha256=sha256)
    fp = fingerprint(whole)
    inputs = np.empty((cfg.augment + 1, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    params = np.zeros((cfg.augment + 1, 4), np.float32)
    pipeline.scale(base, out=inputs[0])
    for v in range(1, cfg.augment + 1):
        params[v] = view_params(sha256, v, cfg.seed, cfg.jitter)
        pipeline.scale(apply_view(base, params[v]), out=inputs[v])
    return inputs, params, fp


def decode_job(path: str, sha256: str, cfg: ExtractConfig, pipeline: InputPipeline):
    """prepare_image, with every failure of the image turned into a skip reason (a string).

    What is not the image's fault stops the run instead, and nothing is recorded for the file
    (a skip would last in an immutable shard): a file that cannot be read now, a file whose
    bytes are not the listed ones (:class:`FileChanged`), and memory running out."""
    try:
        return prepare_image(path, sha256, cfg, pipeline)
    except UnreadableImage as exc:
        return str(exc)
    except (FileUnavailable, FileChanged):
        raise
    except MemoryError:
        raise OutOfMemory(f"{path}: memory ran out while decoding it; nothing was recorded for it. Free memory (or "
                          "use fewer --workers) and run again: finished shards are kept.") from None
    except Exception as exc:  # an unexpected decoder failure is still a per-file skip
        return f"unreadable ({type(exc).__name__}: {exc})"


def one_thread_per_stream(tf) -> bool:
    """Give each operation one thread, when TensorFlow has not started and nobody chose otherwise:
    extraction keeps STREAMS batches in the model at once, and with TensorFlow's default (every
    core for each operation) the streams' threads fight over the cores.  ``bench_extract.py`` on
    an Intel Xeon, 2 cores (benchmarks/results/intel-xeon-amx/extract.md at commits 01ed0ff and
    8383168, the same day): float32 files to HDF5 40.7, 19.0, 19.5 and 16.8 img/s became 42.5,
    20.0, 19.9 and 17.0; bfloat16 gained most (densenet201 1.28x float32 became 1.42x).  The
    features are the same bit for bit (checked by hand on all four backbones and both bfloat16
    routes; tests/test_extract.py compares inception_v3 in two fresh processes), so a process
    where TensorFlow already runs keeps its threads and loses only speed.  True when set."""
    if tf.config.threading.get_intra_op_parallelism_threads() != 0:
        return False
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started in this process
        return False
    return True


class ShardComputer:
    """The forward pass of one shard's decoded images, in batches formed within the shard, so
    every driver computes a shard's features identically."""

    def __init__(self, cfg: ExtractConfig, backbone: Backbone, weights: WeightsSpec):
        """``backbone`` and ``weights`` as the extraction's plan resolved them (or a Ray actor,
        on its node): built here, never resolved again."""
        from covfeat.core.quiet import import_tensorflow

        self.route = route_of(cfg.backbone, cfg.precision)
        prepare_process(self.route)  # before TensorFlow starts, for the onednn route
        import_tensorflow()
        import tensorflow as tf

        if OWN_PROCESS:
            one_thread_per_stream(tf)
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        self.threads = str(intra) if intra else "TensorFlow's default"  # per operation, recorded with the timings

        self.cfg, self.backbone, self._tf = cfg, backbone, tf
        # One graph for any batch size (kept in covfeat's graph cache, see covfeat.extraction.graphfile),
        # instantiated here on a single image: a warm-up batch of batch_size images would cost
        # a whole batch's forward pass for nothing (1 s for densenet201 on 2 cores); the
        # features are the same, bit for bit (tests/test_extract.py).
        # Measured on CPUs only: on a GPU the optimiser's layout and fusion passes stay on.  The
        # mixed_fused_bn route keeps it too: there it rewrites the graph around each FusedBatchNormV3
        # (which rewrite was not isolated) and the route runs faster (bench_fused_bn.py, Intel Xeon,
        # 2026-12-02: inception_v3 129.7 img/s with it, 101.9 without; densenet201 41.4 and 25.3).
        self._as_traced = not tf.config.list_logical_devices("GPU") and self.route != "mixed_fused_bn"
        self._forward = backbone_forward(backbone, weights, seed=cfg.seed, route=self.route)
        try:
            self.forward(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
        except (tf.errors.OpError, TypeError, ValueError) as exc:
            if self._forward.source != "cache":
                raise
            discard(self._forward, exc)  # a cached graph this TensorFlow cannot run: build it again
            self._forward = backbone_forward(backbone, weights, seed=cfg.seed, route=self.route)
            self.forward(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
        self.batches = [np.zeros((cfg.batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.float32) for _ in range(STREAMS)]
        self.t_fwd = 0.0
        self.n_fwd = 0

    @contextmanager
    def _graph_as_traced(self):
        """TensorFlow's graph optimiser (grappler) finds nothing to gain in these inference
        graphs on a CPU yet spends 0.3-1.0 s on each one when first called (densenet201 0.9 s,
        inception_resnet_v2 1.0 s); with it off the four backbones give the same features, bit
        for bit, at the same speed (measured; tests/test_extract.py holds the equality).  Not so
        for the mixed_fused_bn route, whose fused BatchNormalizations it rewrites to gain: it stays
        on there (``_as_traced`` is False).  The
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
