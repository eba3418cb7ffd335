"""The Ray driver of extraction: the shards that are missing, computed by an actor pool.

Ray Data's ``map_batches`` runs a pool of actors, each building the frozen backbone once
and computing whole shards with :func:`covfeat.extraction.extract_shard`, the same function
every driver uses, so a Ray cache equals a local one array for array.  Actors are
restarted and shards retried by Ray; a shard exists only once complete, so a retry
rewrites the same file.  Ray is optional (``pip install -e ".[ray]"``); without an
address an embedded local Ray starts, with one it joins the cluster (``ray start --head``
or ``RAY_ADDRESS``).
"""

from __future__ import annotations

import os
import sys
import time

from covfeat.core.errors import ConfigError
from covfeat.extraction.images import InputPipeline


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _ShardActor:
    """Holds the backbone once; computes the shards it is given."""

    def __init__(self, target: str, key: str, rows: list[dict], shards: dict, cfg: dict, weights: str,
                 identity: str):
        from pathlib import Path

        from covfeat.core.settings import from_dict
        from covfeat.extraction.backbones import get_backbone, resolve_weights
        from covfeat.extraction.config import ExtractConfig
        from covfeat.extraction.work import ShardComputer
        from covfeat.store.shards import ShardSpec, ShardStore

        self.cfg = from_dict(ExtractConfig, {**cfg, "weights": weights}, "the driver's config")
        backbone = get_backbone(self.cfg.backbone)
        spec = resolve_weights(backbone, self.cfg.weights, seed=self.cfg.seed)
        if spec.identity != identity:  # a node with another file at the same path must not add shards
            from covfeat.core.errors import WeightsUnavailable

            raise WeightsUnavailable(f"The weights on this Ray node ({spec.identity}) are not the planned ones "
                                     f"({identity}); put the same file at {weights} on every node.")
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        self.computer = ShardComputer(self.cfg, backbone, spec)
        self.pipeline = InputPipeline.for_config(self.cfg)
        self.store = ShardStore(Path(target), key)
        self.rows = rows
        self.shards = {int(k): ShardSpec(int(k), tuple(v[0]), v[1]) for k, v in shards.items()}

    def __call__(self, batch):
        from covfeat.extraction.work import extract_shard

        done = []
        for k in batch["shard"]:
            spec = self.shards[int(k)]
            if not self.store.path(spec).is_file():  # another attempt may have finished it
                extract_shard(spec, self.rows, self.cfg, self.pipeline, self.store, self.computer)
            done.append(int(k))
        return {"shard": done}


def run_ray(todo, plan, cfg, driver, progress: bool = True) -> dict:
    """Compute ``todo`` shards on Ray; returns timings."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--engine ray needs Ray with its data library: pip install -e \".[ray]\" "
                          "(or pip install 'ray[data]').") from None
    from dataclasses import asdict

    from covfeat.core.quiet import import_tensorflow

    import_tensorflow()
    address = driver.address or os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, logging_level="ERROR")
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=os.cpu_count(), **kw)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--address {address}: cannot join the Ray cluster ({str(exc).splitlines()[0]}); "
                              "start it with `ray start --head`, or leave --address out for a local Ray.") from None
    import logging

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.verbose_stats_logs = False
    cfg_dict = {k: v for k, v in asdict(cfg).items() if k != "weights"}
    weights = cfg.weights if plan.spec.kind != "file" else plan.spec.path
    shards = {s.index: (list(s.rows), s.name) for s in todo}
    ds = ray.data.from_items([{"shard": s.index} for s in todo], override_num_blocks=len(todo))
    out = ds.map_batches(
        _ShardActor, batch_size=1, concurrency=driver.ray_workers, num_cpus=driver.cpus_per_worker,
        num_gpus=driver.gpus_per_worker or None,
        fn_constructor_kwargs=dict(target=str(plan.target.resolve()), key=plan.key, rows=plan.rows, shards=shards,
                                   cfg=cfg_dict, weights=weights, identity=plan.spec.identity))  # Ray Data restarts its actors and retries by default
    n = 0
    try:
        for _ in out.iter_rows():
            n += 1
    except Exception as exc:  # a worker's covfeat error comes back wrapped by Ray: give the user its own line
        from covfeat.core.errors import CovfeatError

        cause = exc
        while cause is not None and not isinstance(cause, CovfeatError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    _log(f"Ray: {n} shard(s) computed by {driver.ray_workers} worker(s) in {time.perf_counter() - t0:.1f} s.")
    return {"ray_seconds": time.perf_counter() - t0, "ray_workers": driver.ray_workers, "shards_computed": n}
