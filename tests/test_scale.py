"""Extraction as immutable shards: every driver (local, Ray, --shard i/N) gives the same cache,
array for array; a rerun computes only what is missing; a damaged shard is named."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_mini
from typer.testing import CliRunner

from covfeat.cli import app

runner = CliRunner()
ARRAYS = ("features", "row", "view", "label", "aug_params")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("scale"), n_covid=24, n_normal=24)  # 48 images: 2 shards


def _args(data, cache_dir, *more):
    return ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "1", "--data", str(data["cohen"]),
            "--data", str(data["normal"]), "--cache-dir", str(cache_dir), *more]


def _cli(*args, **kw):
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "covfeat.cli", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    r = _cli(*_args(data, tmp_path_factory.mktemp("ref")))
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path):
    assert a.name == b.name  # the same key
    with h5py.File(a) as ha, h5py.File(b) as hb:
        assert ha["features"].is_virtual and hb["features"].is_virtual
        for k in ARRAYS:
            np.testing.assert_array_equal(ha[k][:], hb[k][:], err_msg=k)


@pytest.mark.slow  # 32 s; the default suite keeps --shard slices through the CLI in tests/test_bytes_clean.py
def test_slices_in_separate_processes_then_the_merge_equal_the_reference(data, reference, tmp_path):
    c = tmp_path / "c"
    outs = []
    for i in range(3):  # 2 shards, 3 slices: slice 2 has none; the slice that completes the set merges
        r = _cli(*_args(data, c, "--shard", f"{i}/3"))
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == "shards written; the index follows when every shard is present"
    assert outs[1] == outs[2] and "nothing to do" in r.stderr
    index = Path(outs[1])
    _same(index, reference)
    from covfeat.head.config import FitConfig, HeadConfig
    from covfeat.head.fit import fit_head

    runs = [fit_head(x, FitConfig(head=HeadConfig(epochs=3)), tmp_path / n, progress=False)
            for x, n in ((index, "a"), (reference, "b"))]
    import keras

    wa, wb = (keras.models.load_model(r / "head.keras").get_weights() for r in runs)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # 32 s; tests/test_extract.py's kill -9 then resume holds the claim in the default suite
def test_a_killed_driver_resumes_by_subtraction(data, reference, tmp_path, monkeypatch):
    c = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "covfeat.cli", *_args(data, c)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, COVFEAT_NO_PROGRESS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and not list(c.glob("*.shards/shard-*.h5")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(c.glob("*.shards/shard-*.h5"))) == 1 and not list(c.glob("*.h5"))
    r = _cli(*_args(data, c))
    assert r.returncode == 0, r.stderr
    assert "Resuming: 1 of 2 shards already extracted; computing 1." in r.stderr
    _same(Path(r.stdout.strip().splitlines()[-1]), reference)


@pytest.mark.slow  # 21 s; tests/test_bytes_clean.py's --rebuild of a damaged shard holds the default suite's share
def test_a_damaged_or_missing_shard_keeps_the_index_unwritten_and_is_named(data, tmp_path):
    c = tmp_path / "c"
    for i in range(2):
        assert _cli(*_args(data, c, "--shard", f"{i}/2")).returncode == 0
    idx = next(c.glob("*.h5"))
    shards = sorted(c.glob("*.shards/shard-*.h5"))
    shards[0].rename(shards[0].with_suffix(".moved"))
    r = runner.invoke(app, ["info", str(idx)])
    assert r.exit_code == 1 and f"is damaged (shard {shards[0]} is missing)" in r.stderr
    shards[0].with_suffix(".moved").rename(shards[0])
    idx.unlink()  # the index is gone; a shard is damaged: the merge must not write it
    with h5py.File(shards[1], "r") as h:
        info = h["features"].id.get_chunk_info(2)
    with open(shards[1], "r+b") as f:
        f.seek(info.byte_offset + 8)
        f.write(b"\xff\xff\xff\xff")
    r = runner.invoke(app, _args(data, c))
    assert r.exit_code == 1 and f"shard {shards[1]} is damaged" in r.stderr, r.output
    assert not list(c.glob("*.h5"))


ray = pytest.importorskip("ray", reason="Ray is the optional extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow  # Ray is an optional extra; 40 s with its cluster
def test_ray_on_a_local_two_worker_cluster_equals_the_local_driver(data, reference, tmp_path, ray_cluster):
    from covfeat.extraction.config import DriverConfig, ExtractConfig
    from covfeat.extraction.run import extract

    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1)
    out = extract([data["cohen"], data["normal"]], cfg, tmp_path / "c", progress=False,
                  driver=DriverConfig(engine="ray", ray_workers=2))
    _same(out, reference)


@pytest.mark.slow  # about a minute and a half alone: the slowest test; Ray is an optional extra
def test_a_killed_ray_worker_is_restarted_and_every_image_appears_once(data, tmp_path, ray_cluster, monkeypatch):
    """Shards of 4 images (12 of them); one worker is killed with SIGKILL after the first shard."""
    import covfeat.extraction.run as ex
    import covfeat.store.shards
    from covfeat.extraction.config import DriverConfig, ExtractConfig

    monkeypatch.setattr(covfeat.store.shards, "SHARD_IMAGES", 4)
    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1)
    c = tmp_path / "c"
    killed = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not list(c.glob("*.shards/shard-*.h5")):
            time.sleep(0.05)
        out = subprocess.run(["pgrep", "-f", "_ShardActor"], capture_output=True, text=True).stdout.split()
        if out:
            os.kill(int(out[0]), signal.SIGKILL)
            killed.append(out[0])

    import threading

    t = threading.Thread(target=killer)
    t.start()
    index = ex.extract([data["cohen"], data["normal"]], cfg, c, progress=False,
                       driver=DriverConfig(engine="ray", ray_workers=2))
    t.join()
    assert killed, "no worker to kill"
    ref = ex.extract([data["cohen"], data["normal"]], cfg, tmp_path / "local", progress=False)
    _same(index, ref)
    with h5py.File(index) as h:
        rows = h["row"][:]
    assert sorted(np.bincount(rows)) == [2] * 48  # every image once, with its two views


def test_a_ray_actor_is_described_by_the_plan_and_refuses_other_weights(data, tmp_path):
    """A Ray actor rebuilds the backbone on its node from the plan's description, and a node
    with another weights file at the planned path adds no shard (checked before any model is built)."""
    from covfeat.core.errors import WeightsUnavailable
    from covfeat.core.settings import from_dict
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.plan import plan
    from covfeat.extraction.ray_driver import _ShardActor, actor_description

    weights = tmp_path / "w.h5"
    weights.write_bytes(b"planned")
    cfg = ExtractConfig(backbone="inception_v3", weights=str(weights), augment=1)
    p = plan([data["cohen"], data["normal"]], cfg, tmp_path / "c")
    desc = actor_description(p, p.shards)
    assert from_dict(ExtractConfig, desc["cfg"], "test") == replace(cfg, weights=p.weights.path)
    assert desc["identity"] == p.weights.identity and desc["key"] == p.key and desc["rows"] == p.rows
    weights.write_bytes(b"another file")
    with pytest.raises(WeightsUnavailable, match=r"The weights on this Ray node \(file:sha256=.*\) are not the "
                                                 r"planned ones \(file:sha256="):
        _ShardActor(**desc)


def test_a_ray_actor_refuses_a_lungs_model_that_is_not_the_planned_one(data, tmp_path, tiny_lungs):
    """The lungs model's hash is in the cache key: an actor whose node holds another model at the
    planned folder adds no shard (the node's model is checked against the plan's hash)."""
    from covfeat.core.errors import ConfigError
    from covfeat.extraction.config import ExtractConfig, LungsConfig
    from covfeat.extraction.plan import plan
    from covfeat.extraction.ray_driver import _ShardActor, actor_description

    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=0,
                        lungs=LungsConfig(model=str(tiny_lungs), outside="blank"))
    p = plan([data["cohen"], data["normal"]], cfg, tmp_path / "c")
    desc = actor_description(p, p.shards)
    assert list(desc["lungs"].values()) == list(p.pipeline.lungs_hashes.values()) and len(desc["lungs"]) == 1
    desc["lungs"] = {k: "0" * 64 for k in desc["lungs"]}  # what the planner saw at that folder
    with pytest.raises(ConfigError, match=r"The lungs model at .* on this Ray node \(\w{64}\) is not the planned one "
                                          r"\(0{64}\); put the same lungs folder at that path on every node\."):
        _ShardActor(**desc)
