"""The Ray driver of extraction: the shards that are missing, computed by an actor pool.

Ray Data's ``map_batches`` runs a pool of actors, each building the frozen backbone once
and computing whole shards with :func:`covfeat.extraction.work.extract_shard`, the same function
every driver uses, so a Ray cache equals a local one array for array.  Actors are
restarted and shards retried by Ray, at most ``--max-retries`` times (Ray's default is
without end); a shard exists only once complete, so a retry rewrites the same file.  Before
any actor is built every node must see the cache folder, and each actor checks its node's
weights, lungs model, library versions and graph-cache entry against the driver's
(:mod:`covfeat.extraction.ray_checks`).  Ray is optional (``pip install -e ".[ray]"``); without an
address an embedded local Ray starts, with one it joins the cluster (``ray start --head``
or ``RAY_ADDRESS``).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from covfeat.core.errors import ConfigError, CovfeatError, WeightsUnavailable
from covfeat.core.settings import from_dict
from covfeat.extraction.config import DriverConfig, ExtractConfig
from covfeat.extraction.graphfile import graph_key
from covfeat.extraction.plan import Plan, log, resolve
from covfeat.extraction.ray_checks import (
    check_all_present,
    check_node,
    check_shared_folder,
    died,
    gave_up,
    node_versions,
)
from covfeat.extraction.work import ShardComputer, extract_shard
from covfeat.store.shards import ShardSpec, ShardStore


def actor_description(p: Plan, todo: list[ShardSpec]) -> dict:
    """What a Ray actor is built from, all of it from the plan: plain values an actor on any
    node can unpickle, its weights named so that node can find them (a file by its resolved
    path, imagenet through that node's Keras cache) and checked against the planned identity."""
    return dict(target=str(p.target.resolve()), key=p.key, rows=p.rows,
                shards={s.index: (list(s.rows), s.name) for s in todo},
                cfg={**asdict(p.cfg), "weights": p.weights.path if p.weights.kind == "file" else p.cfg.weights},
                identity=p.weights.identity, lungs=p.pipeline.lungs_hashes, versions=node_versions(),
                graph=graph_key(p.backbone, p.weights, p.cfg.seed))


class _ShardActor:
    """Holds the backbone once; computes the shards it is given."""

    def __init__(self, target: str, key: str, rows: list[dict], shards: dict, cfg: dict, identity: str,
                 lungs: dict | None = None, versions: dict | None = None, graph: tuple | None = None):
        self.cfg = from_dict(ExtractConfig, cfg, "the driver's config")
        # Rebuilt here: the weights a node resolves are its own, and must be the planned ones.
        backbone, weights, self.pipeline = resolve(self.cfg)
        if weights.identity != identity:  # a node with another file at the same path must not add shards
            raise WeightsUnavailable(f"The weights on this Ray node ({weights.identity}) are not the planned ones "
                                     f"({identity}); put the same file at {self.cfg.weights} on every node.")
        for folder, planned in (lungs or {}).items():  # the same for a lungs model: its hash is in the key
            found = self.pipeline.lungs_hashes.get(folder)
            if found != planned:
                raise ConfigError(f"The lungs model at {folder} on this Ray node ({found}) is not the planned one "
                                  f"({planned}); put the same lungs folder at that path on every node.")
        check_node(versions, graph, backbone, weights, self.cfg.seed)
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        import covfeat.extraction.work

        covfeat.extraction.work.OWN_PROCESS = True  # a Ray worker only extracts
        self.computer = ShardComputer(self.cfg, backbone, weights)
        self.store = ShardStore(Path(target), key)
        self.rows = rows
        self.shards = {int(k): ShardSpec(int(k), tuple(v[0]), v[1]) for k, v in shards.items()}

    def __call__(self, batch):
        done = []
        for k in batch["shard"]:
            spec = self.shards[int(k)]
            if not self.store.path(spec).is_file():  # another attempt may have finished it
                extract_shard(spec, self.rows, self.cfg, self.pipeline, self.store, self.computer)
            done.append(int(k))
        return {"shard": done}


def run_ray(todo: list[ShardSpec], p: Plan, driver: DriverConfig, progress: bool = True) -> dict:
    """Compute ``todo`` shards on Ray; returns timings."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--engine ray needs Ray with its data library: pip install -e \".[ray]\" "
                          "(or pip install 'ray[data]').") from None
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
    store = ShardStore(p.target, p.key)
    nodes = check_shared_folder(ray, store.dir)  # before any actor: a node writing elsewhere adds nothing
    ds = ray.data.from_items([{"shard": s.index} for s in todo], override_num_blocks=len(todo))
    with warnings.catch_warnings():  # Ray 2.60 warns that remote args by keyword are deprecated, yet has no other way
        warnings.simplefilter("ignore", DeprecationWarning)
        out = ds.map_batches(
            _ShardActor, batch_size=1, concurrency=driver.ray_workers, num_cpus=driver.cpus_per_worker,
            num_gpus=driver.gpus_per_worker or None,
            fn_constructor_kwargs=actor_description(p, todo),
            # Ray Data's defaults restart actors and retry their tasks without end (-1): a shard whose
            # actor always dies would run forever.
            max_restarts=driver.max_retries, max_task_retries=driver.max_retries)
    n = 0
    try:
        for _ in out.iter_rows():
            n += 1
    except Exception as exc:  # a worker's covfeat error comes back wrapped by Ray: give the user its own line
        cause = exc
        while cause is not None and not isinstance(cause, CovfeatError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None:
            raise cause from None
        if not died(exc, ray):
            raise  # not a worker's death: a bug, with its traceback
        raise gave_up(exc, store.missing(todo), driver.max_retries) from None
    check_all_present(store.missing(todo), store.dir, n)
    log(f"Ray: {n} shard(s) computed by {driver.ray_workers} worker(s) on {nodes} node(s) in "
        f"{time.perf_counter() - t0:.1f} s.")
    return {"ray_seconds": time.perf_counter() - t0, "ray_workers": driver.ray_workers, "shards_computed": n}
