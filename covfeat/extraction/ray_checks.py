"""What a Ray extraction checks so that it cannot fail silently or forever.

A Ray run writes its shards from the workers, into the driver's cache folder: a worker that
sees another folder at that path (a local disk, a container's own /tmp) writes shards that the
driver never finds, and before these checks every rerun said "the index follows" and exited 0.
So, before any actor is built, :func:`check_shared_folder` has a task on every alive node read
back a probe file the driver wrote; :func:`check_node` makes each actor compare its node's
library versions and graph-cache entry with the driver's; and :func:`gave_up` turns a shard
whose retries ran out into one line naming it and Ray's last error.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

from covfeat.core.errors import CacheError, ConfigError
from covfeat.core.fsutil import temp_path
from covfeat.store.key import library_versions
from covfeat.store.shards import ShardSpec

PROBE_SECONDS = 120  # a node that cannot answer within this is refused too: it could not compute a shard either


def node_versions() -> dict[str, str | None]:
    """The versions of this node's libraries that change features: the very ones every shard
    records and a merge compares (:func:`covfeat.store.key.library_versions`), so a node that
    the merge would refuse is refused before it computes anything."""
    return library_versions()


def node_name() -> str:
    """This worker's node, as a user finds it in `ray status`: its IP and Ray node id."""
    try:
        import ray

        if ray.is_initialized():
            return f"Ray node {ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()})"
    except ImportError:
        pass
    return f"node {socket.gethostname()}"


def _read_probe(path: str) -> tuple[str, str | None]:
    """On a node: (that node's name, the probe's content or why it cannot be read)."""
    try:
        return node_name(), Path(path).read_text()
    except OSError as exc:
        return node_name(), f"unreadable: {exc.strerror or exc}"


def check_shared_folder(ray, folder: Path) -> int:
    """Refuse a cache folder that some alive node does not see as the driver does; returns the
    number of nodes checked.

    The driver writes a probe file of random name and content in ``folder`` (the shards'
    folder) and a task pinned to every alive node (``soft=False``: never run elsewhere) reads
    it back.  The probe is removed after; its name is a covfeat temporary name, so a killed
    driver's probe is swept by ``covfeat clean``.

    Raises
    ------
    ConfigError
        A node read nothing, or other content, or did not answer.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    probe, content = temp_path(folder / "ray-probe"), secrets.token_hex(16)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
    try:
        probe.write_text(content)
        refs = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe)): n for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_SECONDS)
        answers = {ref: ray.get(ref) for ref in ready}
    finally:
        probe.unlink(missing_ok=True)
    for ref, n in refs.items():
        if ref in late:
            who, seen = f"Ray node {n.get('NodeManagerAddress')} (node id {n['NodeID']})", "no answer"
        else:
            who, seen = answers[ref]
        if seen != content:
            why = f"no answer within {PROBE_SECONDS} s" if seen == "no answer" else (
                seen if seen.startswith("unreadable") else "another file at that path")
            raise ConfigError(f"{who} does not see the cache folder {folder} as the driver does ({why}); the cache "
                              "folder must be shared storage at the same path on every node (--cache-dir).")
    return len(nodes)


def check_node(versions: dict[str, str] | None, graph: tuple[str, dict] | None, backbone, weights, seed: int) -> None:
    """In an actor, before any model is built: this node's library versions and the key of its
    graph-cache entry (:func:`covfeat.extraction.graphfile.graph_key`) must be the driver's.

    Raises
    ------
    ConfigError
        One line naming the node and the difference.
    """
    if versions is not None:
        here = node_versions()
        diff = [f"{k} {here.get(k)} here, {v} on the driver" for k, v in versions.items() if here.get(k) != v]
        if diff:
            raise ConfigError(f"{node_name()} has other libraries than the driver ({'; '.join(diff)}); its shards "
                              "would differ: install the same versions on every node.")
    if graph is not None:
        from covfeat.extraction.graphfile import graph_key

        key, what = graph_key(backbone, weights, seed)
        if key != graph[0]:
            diff = [k for k in sorted(set(what) | set(graph[1])) if what.get(k) != graph[1].get(k)]
            said = ", ".join(diff) if diff else "covfeat's backbone and graph code"
            raise ConfigError(f"{node_name()} would run another backbone graph than the driver (graph-cache entry "
                              f"{key}, the driver's {graph[0]}; differs in: {said}): install the same covfeat and "
                              "libraries on every node.")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, Ray's wrapped ``cause`` included, outermost first."""
    seen, cause = [], exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    return seen


def died(exc: BaseException, ray) -> bool:
    """True when Ray gave up because a worker or its node died (the retries ran out), not
    because the code raised."""
    deaths = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
              ray.exceptions.NodeDiedError)
    return any(isinstance(e, deaths) for e in _chain(exc))


def last_error(exc: BaseException) -> str:
    """Ray's last error, one line: the innermost death's first line and, when Ray gives it, the
    worker's exit type and detail (a kill for memory, a crash), without Ray's list of causes."""
    lines = [ln.strip() for e in reversed(_chain(exc)) for ln in str(e).splitlines() if ln.strip()]
    died_line = next((ln for ln in lines if "died" in ln.lower()), None)
    exit_line = next((ln for ln in lines if "exit type" in ln.lower() or "exit detail" in ln.lower()), None)
    if exit_line:
        exit_line = exit_line.split(" Some common causes")[0]
    text = " ".join(x for x in (died_line, exit_line) if x) or (lines or [type(exc).__name__])[0]
    return text if len(text) <= 500 else text[:500] + "..."


def gave_up(exc: BaseException, missing: list[ShardSpec], retries: int) -> CacheError:
    """The one line for a Ray run that stopped with shards not computed."""
    names = ", ".join(f"shard {s.index} ({s.name})" for s in missing[:5])
    names += f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return CacheError(f"Ray stopped after at most {retries} retr{'y' if retries == 1 else 'ies'} (--max-retries) "
                      f"with {len(missing)} shard(s) not computed ({names or 'none missing'}); last error: "
                      f"{last_error(exc)}")


def check_all_present(missing: list[ShardSpec], folder: Path, n: int) -> None:
    """After a Ray run that reported every shard done: the driver must see every one of them.

    Raises
    ------
    CacheError
        Some shard is not in the driver's folder (the workers wrote elsewhere).
    """
    if missing:
        raise CacheError(f"Ray reported {n} shard(s) computed, but {len(missing)} of them (first: {missing[0].name}) "
                         f"are not in {folder} as the driver sees it: the cache folder must be shared storage at the "
                         "same path on every node (--cache-dir).")
