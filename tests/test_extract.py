"""covfeat extract as a user runs it: real image files in, a complete HDF5 cache out."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_mini
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.fsutil import HOST
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.plan import plan
from covfeat.store.lock import CacheLock
from covfeat.store.reader import open_cache

runner = CliRunner()
BASE = ["extract", "--backbone", "inception_v3", "--weights", "none", "--augment", "1"]


def run_cli(args):
    return runner.invoke(app, args, catch_exceptions=False)


def data_args(mini):
    return ["--data", str(mini["cohen"]), "--data", str(mini["normal"])]


def test_extract_writes_complete_cache_and_reuses_it(mini, tmp_path):
    r = run_cli(BASE + data_args(mini))
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent == Path("cache").resolve() or path.parent.name == "cache"
    assert "NOT PRETRAINED" in r.stderr and "1 listed files missing" in r.stderr
    with h5py.File(path) as h:
        n = (mini["n_covid"] + mini["n_normal"]) * 2
        assert h["features"].shape == (n, 5, 5, 2048) and h["features"].dtype == np.float16
        assert h["features"].is_virtual  # over the immutable shards, one chunk per map in each
        shard = path.parent / json.loads(h.attrs["shards"])[0][0]
    with h5py.File(shard) as s:
        assert s["features"].chunks == (1, 5, 5, 2048) and s["features"].fletcher32
    with h5py.File(path) as h:
        assert sorted(np.unique(h["view"][:])) == [0, 1]
        assert h["label"][:].sum() == mini["n_covid"] * 2
        assert "split" not in h and "split" not in h["manifest"]  # the split is fit-head's
        assert h.attrs["complete"]
        cfg = json.loads(h.attrs["config"])
        assert cfg["weights"]["pretrained"] is False and cfg["preprocess"] == "paper" and cfg["augment"] == 1
        assert "tensorflow" in json.loads(h.attrs["versions"])
        rows = h["row"][:]
        assert (np.bincount(rows) == 2).all()
    t = time.perf_counter()
    r2 = run_cli(BASE + data_args(mini))
    assert r2.stdout.strip().splitlines()[-1] == str(path)
    assert "nothing to do" in r2.stderr and time.perf_counter() - t < 10


@pytest.mark.parametrize("change", ["weights_file", "data_content", "data_label"])
def test_weights_and_data_enter_the_cache_key_but_not_the_folder(mini, tmp_path, change):
    """The key covers the weights' identity and the images' content and labels; not their path.
    (Every config field is covered by tests/test_config.py, derived from the dataclass.)"""
    base = plan([mini["cohen"], mini["normal"]], ExtractConfig(backbone="inception_v3", weights="none"))
    cohen, normal, kw = mini["cohen"], mini["normal"], {}
    if change == "weights_file":
        f = tmp_path / "w.h5"
        f.write_bytes(b"x")
        kw = {"weights": str(f)}
    elif change == "data_content":
        other = make_mini(tmp_path / "o")
        img = next(other["normal"].iterdir())
        img.write_bytes(img.read_bytes() + b"\0")
        cohen, normal = other["cohen"], other["normal"]
    else:
        root = tmp_path / "folders"  # the same bytes with the labels swapped
        shutil.copytree(mini["normal"], root / "COVID-19")
        shutil.copytree(mini["cohen"] / "images", root / "NORMAL")
        cohen, normal = root, None
    cfg = ExtractConfig(**{"backbone": "inception_v3", "weights": "none", **kw})
    other = plan([s for s in (cohen, normal) if s is not None], cfg)
    assert other.target.name != base.target.name
    moved = tmp_path / "moved"
    shutil.copytree(mini["cohen"], moved / "cohen")
    shutil.copytree(mini["normal"], moved / "NORMAL")
    same = plan([moved / "cohen", moved / "NORMAL"], ExtractConfig(backbone="inception_v3", weights="none"))
    assert same.target.name == base.target.name


def test_bad_files_are_skipped_with_reasons(mini, tmp_path):
    bad = make_mini(tmp_path / "bad")
    normal = bad["normal"]
    (normal / "IM-9000-0001.jpeg").write_bytes(b"")
    good = next(normal.iterdir()).read_bytes()
    (normal / "IM-9001-0001.jpeg").write_bytes(good[: len(good) // 2])
    (normal / "IM-9002-0001.png").write_bytes(b"not an image at all")
    r = run_cli(BASE + ["--augment", "0"] + data_args(bad))
    assert r.exit_code == 0, r.output
    assert "Skipped 3 unreadable file(s)" in r.stderr
    fc = open_cache(r.stdout.strip().splitlines()[-1])
    reasons = dict((Path(p).name, why) for p, why in fc.skipped)
    assert reasons == {"IM-9000-0001.jpeg": "zero-byte file",
                       "IM-9001-0001.jpeg": "truncated JPEG (no end-of-image marker)",
                       "IM-9002-0001.png": "not a decodable image (corrupt, truncated or not an image)"}
    assert len(fc.labels) == bad["n_covid"] + bad["n_normal"]


def test_one_class_only_is_a_clear_error(mini):
    r = run_cli(BASE + ["--data", str(mini["normal"])])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: No COVID-19 images in the given data ({mini['n_normal']} images (0 COVID-19, "
        f"{mini['n_normal']} NORMAL)); covfeat needs both COVID-19 and NORMAL images."
    )


def test_class_with_no_readable_image_fails_before_model(tmp_path, mini, monkeypatch):
    bad = make_mini(tmp_path / "bad", n_covid=2)
    for i, p in enumerate((bad["cohen"] / "images").iterdir()):
        p.write_bytes(b"broken %d" % i)
    import covfeat.extraction.work as ex

    monkeypatch.setattr(ex, "backbone_forward", lambda *a, **k: pytest.fail("model built or loaded"))
    r = run_cli(BASE + data_args(bad))
    assert r.exit_code == 1
    assert "error: No readable COVID-19 image: all 2 failed to decode" in r.stderr


def test_unknown_backbone_and_bad_option(mini):
    r = run_cli(["extract", "--backbone", "vgg16", "--weights", "none"])
    assert r.exit_code == 1
    assert r.stderr == ("error: --backbone: expected a registered backbone, one of inception_v3, inception_resnet_v2, "
                        "densenet201, resnet101_v2, got 'vgg16'.\n")
    r = run_cli(BASE + ["--preprocess", "fancy"])
    assert r.exit_code == 1 and r.stderr == "error: --preprocess: expected one of 'paper', 'backbone', got 'fancy'.\n"


def test_default_is_the_bundled_sample(tmp_path):
    from covfeat.extraction.plan import sample_sources
    from covfeat.extraction.sources import load_sources

    m = load_sources(sample_sources())
    assert m.counts() == {"COVID-19": 30, "NORMAL": 30}
    notice = (sample_sources()[0].parent / "NOTICE").read_text()
    assert "CC BY 4.0" in notice and "CC BY-NC-SA" in notice


def _cli_cmd(*args):
    return [sys.executable, "-m", "covfeat.cli", *args]


def test_lock_refuses_a_second_writer(mini, tmp_path):
    target = plan([mini["cohen"], mini["normal"]], ExtractConfig(backbone="inception_v3", weights="none", augment=1),
                  tmp_path / "b").target
    name = target.name
    with CacheLock(target):
        r2 = run_cli(BASE + data_args(mini) + ["--cache-dir", str(tmp_path / "b")])
    assert r2.exit_code == 1
    assert f"error: Another covfeat process (pid {os.getpid()} on {HOST}) is writing {name}" in r2.stderr
    assert not target.exists()


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    data = make_mini(tmp_path / "d", n_covid=24, n_normal=24)  # 48 rows = 2 shards
    args = ["extract", "--backbone", "inception_v3", "--weights", "none", "--augment", "1",
            "--data", str(data["cohen"]), "--data", str(data["normal"])]
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    proc = subprocess.Popen(_cli_cmd(*args, "--cache-dir", "killed"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not list(Path("killed").glob("*.shards/shard-*.h5")):
        time.sleep(0.2)
    assert list(Path("killed").glob("*.shards/shard-*.h5")), proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(Path("killed").glob("*.h5"))  # nothing looks complete
    resumed = subprocess.run(_cli_cmd(*args, "--cache-dir", "killed"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming: 1 of 2 shards already extracted; computing 1." in resumed.stderr
    clean = subprocess.run(_cli_cmd(*args, "--cache-dir", "clean"), env=env, capture_output=True, text=True)
    a, b = resumed.stdout.strip().splitlines()[-1], clean.stdout.strip().splitlines()[-1]
    assert Path(a).name == Path(b).name
    with h5py.File(a) as ha, h5py.File(b) as hb:
        for k in ("features", "row", "view", "label", "aug_params"):
            np.testing.assert_array_equal(ha[k][:], hb[k][:])
    assert not list(Path("killed").glob("*.shards/.*.tmp"))  # no half-written shard is left


def test_extraction_forward_equals_the_keras_model_batch_by_batch():
    """The extraction's forward pass (one graph for any batch size, warmed on one image, two
    batches at once, graph optimiser off) gives, bit for bit, what the Keras model gives on
    the same batches."""
    import tensorflow as tf

    from covfeat.core.errors import ConfigError
    from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights
    from covfeat.extraction.work import ShardComputer

    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1, batch_size=4, dtype="float32")
    bb = get_backbone("inception_v3")
    spec = resolve_weights(bb, "none")
    computer = ShardComputer(cfg, bb, spec)
    x = np.random.default_rng(0).random((5, 2, 224, 224, 3), dtype=np.float32) * 2 - 1
    fake = [(x[i], np.zeros((2, 4), np.float32), None) for i in range(5)]
    feats = computer.features(fake)[0]
    model = build_backbone(bb, spec, seed=cfg.seed)
    fwd = tf.function(lambda b: model(b, training=False))
    views = x.reshape(10, 224, 224, 3)
    last = np.concatenate([views[8:], np.zeros_like(views[:2])])
    want = np.concatenate([fwd(views[:4]).numpy(), fwd(views[4:8]).numpy(), fwd(last).numpy()[:2]])
    assert feats.dtype == np.float32 and np.array_equal(feats, want)
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)  # restored

    # a batch that float16 cannot hold stops the shard, with both streams busy, and the option is restored
    computer.cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1, batch_size=4)
    computer.features(fake)  # float16 holds these
    forward = computer._forward
    computer._forward = lambda b: forward(b) + 1e6  # beyond float16 (65504)
    with pytest.raises(ConfigError, match="gave feature values that float16 cannot hold"):
        computer.features(fake)
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)


_STREAMS_CHILD = """
import sys
import numpy as np
import covfeat.extraction.work as w
from covfeat.extraction.backbones import get_backbone, resolve_weights
from covfeat.extraction.config import ExtractConfig
w.OWN_PROCESS = sys.argv[1] == "own"
cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1, batch_size=4, dtype="float32")
bb = get_backbone("inception_v3")
computer = w.ShardComputer(cfg, bb, resolve_weights(bb, "none"))
x = np.random.default_rng(0).random((5, 2, 224, 224, 3), dtype=np.float32) * 2 - 1
np.save(sys.argv[2], computer.features([(x[i], np.zeros((2, 4), np.float32), None) for i in range(5)])[0])
print(computer.threads)
"""


def test_a_process_that_only_extracts_gives_each_operation_one_thread_and_the_same_features(tmp_path):
    """The extract command's process runs each operation on one thread (its two streams no longer
    fight over the cores), a library caller's keeps TensorFlow's default, and the features are
    the same bit for bit."""
    got = {}
    for kind in ("own", "library"):
        r = subprocess.run([sys.executable, "-c", _STREAMS_CHILD, kind, str(tmp_path / f"{kind}.npy")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        got[kind] = (r.stdout.strip().splitlines()[-1], np.load(tmp_path / f"{kind}.npy"))
    assert got["own"][0] == "1" and got["library"][0] == "TensorFlow's default"
    assert np.array_equal(got["own"][1], got["library"][1])


def test_an_extraction_resolves_backbone_weights_and_pipeline_once(mini, tmp_path, monkeypatch):
    """The plan resolves the backbone entry, the weights and the input pipeline; the driver,
    the class probe, the shard computations and the merge take them from it.  Counted where
    each caller looks the function up (the pipeline's own lookup of its scaling is the one
    call inside InputPipeline.for_config)."""
    import sys
    from collections import Counter

    import covfeat.extraction.backbones as backbones
    import covfeat.extraction.run as ex
    from covfeat.extraction.images import InputPipeline

    calls = Counter()

    def counted(label, fn):
        def call(*args, **kw):
            calls[label] += 1
            return fn(*args, **kw)
        return call

    originals = {name: getattr(backbones, name) for name in ("get_backbone", "resolve_weights")}
    for mod in [m for n, m in sys.modules.items() if n.startswith("covfeat.")]:
        for name, fn in originals.items():
            if getattr(mod, name, None) is fn:
                monkeypatch.setattr(mod, name, counted(f"{mod.__name__}.{name}", fn))
    for_config = counted("InputPipeline.for_config", InputPipeline.for_config.__func__)
    monkeypatch.setattr(InputPipeline, "for_config", classmethod(for_config))
    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=0)
    assert ex.extract([mini["cohen"], mini["normal"]], cfg, tmp_path / "once", progress=False).is_file()
    assert calls == {"covfeat.extraction.plan.get_backbone": 1, "covfeat.extraction.plan.resolve_weights": 1,
                     "InputPipeline.for_config": 1}  # the pipeline gets the plan's backbone, no lookup of its own
