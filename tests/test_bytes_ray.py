"""Ray runs that cannot fail silently or forever (covfeat issue 18, item 10): a node that does
not see the cache folder stops the run before any actor, a shard whose actor always dies stops
after --max-retries naming it, and an actor refuses a node with other libraries or another
backbone graph than the driver's."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import make_mini

ray = pytest.importorskip("ray", reason="Ray is the optional extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("bray"), n_covid=8, n_normal=8)


def _extract(data, cache_dir, *more, env=None, timeout=900):
    args = [sys.executable, "-m", "covfeat.cli", "extract", "-b", "inception_v3", "--weights", "none", "--augment",
            "0", "--data", str(data["cohen"]), "--data", str(data["normal"]), "--cache-dir", str(cache_dir),
            "--engine", "ray", "--ray-workers", "1", *more]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COVFEAT_NO_PROGRESS="1", **(env or {})))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_nodes(address: str) -> int:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else 0


def _mine(temp: str) -> list[int]:
    """The processes of the clusters this test started: every one names its private temp folder
    (Ray's workers leave the process group of `ray start`)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and temp.encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            pass
    return out


def _stop(procs, temp):
    """End the clusters this test started, by their process ids (never `ray stop`, which would
    stop every Ray on the machine)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    for pid in _mine(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A Ray cluster of two nodes started here: the head, and a node in a private mount namespace
    whose view of ``masked`` is an empty tmpfs (a worker with its own disk at the cache's path)."""
    if shutil.which("unshare") is None or shutil.which("ray") is None:
        pytest.skip("needs unshare(1) and the ray command")
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace with a tmpfs needs root here")
    root = tmp_path_factory.mktemp("two_nodes")
    masked, shared = root / "masked", root / "shared"
    masked.mkdir()
    shared.mkdir()
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # a test cluster on this machine only
    quiet = ["--disable-usage-stats", "--include-dashboard=false", "--num-cpus", "1", "--block"]
    head = subprocess.Popen(["ray", "start", "--head", "--port", str(port), "--temp-dir", temp, *quiet],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    procs = [head]
    try:
        deadline = time.time() + 120
        while _alive_nodes(address) < 1:
            assert time.time() < deadline and head.poll() is None, "the head node did not start"
            time.sleep(2)
        inner = (f"mount -t tmpfs none {masked} && exec ray start --address {address} --disable-usage-stats "
                 f"--temp-dir {temp}/n --num-cpus 1 --block")
        node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
        procs.append(node)
        deadline = time.time() + 120
        while _alive_nodes(address) < 2:
            if node.poll() is not None:
                pytest.skip(f"cannot start a node in a private mount namespace: {node.stderr.read()[-300:]}")
            assert time.time() < deadline, "the second node did not join"
            time.sleep(2)
        yield {"address": address, "masked": masked, "shared": shared}
    finally:
        _stop(procs, temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # a two-node Ray cluster: about a minute
def test_a_node_that_cannot_see_the_cache_folder_stops_the_run_in_one_line(data, two_nodes):
    r = _extract(data, two_nodes["masked"], "--address", two_nodes["address"])
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    ip = two_nodes["address"].split(":")[0]
    assert line.startswith(f"error: Ray node {ip} (node id ") and "does not see the cache folder" in line, r.stderr
    assert (f"{two_nodes['masked']}/inception_v3-none-" in line and "unreadable: No such file or directory" in line
            and "the cache folder must be shared storage at the same path on every node" in line), line
    assert not list(two_nodes["masked"].rglob("*.h5")) and not list(two_nodes["masked"].rglob(".*.tmp"))  # nor probe
    again = _extract(data, two_nodes["masked"], "--address", two_nodes["address"])
    assert again.returncode == 1 and "the index follows" not in again.stderr + again.stdout


@pytest.mark.slow  # the same cluster, a folder both nodes see: the run completes
def test_a_folder_every_node_sees_gives_the_index(data, two_nodes):
    r = _extract(data, two_nodes["shared"], "--address", two_nodes["address"])
    assert r.returncode == 0, r.stderr
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index.is_file() and index.parent == two_nodes["shared"]
    assert "on 2 node(s)" in r.stderr, r.stderr
    assert not list(two_nodes["shared"].rglob(".*.tmp"))


DIE_WHEN_OPENED = """
import os, sys

def _die(event, args):
    # Only in Ray's worker processes, and only for the one file: the worker dies as one killed
    # for memory does, every time it decodes it.
    if event == "open" and isinstance(args[0], str) and args[0].endswith(os.environ["DIE_WHEN_OPENED"]) \\
            and any("default_worker" in a for a in sys.argv):
        os._exit(137)

sys.addaudithook(_die)
"""


@pytest.mark.slow  # an embedded Ray whose actor dies, restarted once: about a minute
def test_a_shard_whose_actor_always_dies_stops_after_max_retries_naming_it(data, tmp_path):
    """A worker dies every time it opens one image (a sitecustomize audit hook on Ray's worker
    processes, as a worker killed for memory on that image would): with --max-retries 1 the run
    stops instead of retrying forever, naming the shard that holds it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_WHEN_OPENED)
    victim = sorted(Path(data["normal"]).iterdir())[0]
    t0 = time.time()
    r = _extract(data, tmp_path / "c", "--max-retries", "1", timeout=600,
                 env={"DIE_WHEN_OPENED": victim.name, "RAY_ADDRESS": "local",
                      "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert re.match(r"error: Ray stopped after at most 1 retry \(--max-retries\) with 1 shard\(s\) not computed "
                    r"\(shard \d+ \(shard-\w+\.h5\)\); last error: The actor died unexpectedly before finishing this "
                    r"task\. .*Worker exit type: SYSTEM_ERROR", line), r.stderr
    assert time.time() - t0 < 600


def _desc(data, tmp_path):
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.plan import plan
    from covfeat.extraction.ray_driver import actor_description

    p = plan([data["cohen"], data["normal"]], ExtractConfig(backbone="inception_v3", weights="none", augment=0),
             tmp_path / "c")
    return actor_description(p, p.shards)


def test_a_ray_actor_refuses_a_node_with_other_library_versions(data, tmp_path):
    from covfeat.core.errors import ConfigError
    from covfeat.extraction.ray_driver import _ShardActor

    desc = _desc(data, tmp_path)
    from covfeat.store.key import library_versions

    assert desc["versions"] == library_versions() and {"covfeat", "tensorflow", "keras", "opencv"} <= set(desc["versions"])
    desc["versions"] = {**desc["versions"], "keras": "2.0.0"}
    with pytest.raises(ConfigError, match=r"^node \S+ has other libraries than the driver \(keras \S+ here, 2\.0\.0 on "
                                          r"the driver\); its shards would differ: install the same versions on "
                                          r"every node\.$"):
        _ShardActor(**desc)


def test_a_ray_actor_refuses_a_node_whose_graph_cache_entry_differs(data, tmp_path):
    from covfeat.core.errors import ConfigError
    from covfeat.extraction.ray_driver import _ShardActor

    desc = _desc(data, tmp_path)
    key, what = desc["graph"]
    desc["graph"] = ("0" * len(key), {**what, "keras_settings": {"floatx": "float16"}})
    with pytest.raises(ConfigError, match=rf"^node \S+ would run another backbone graph than the driver \(graph-cache "
                                          rf"entry {key}, the driver's 0+; differs in: keras_settings\)"):
        _ShardActor(**desc)
