"""--precision bfloat16: in the cache key and recorded, within a cosine of 0.999 of float32's
features, used again by predict, and refused in one line on a CPU without native bfloat16."""

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import covfeat.extraction.precision as precision
from covfeat.cli import app
from covfeat.extraction.config import ExtractConfig, key_config
from covfeat.store.key import cache_key

runner = CliRunner()
NATIVE = precision.bf16_kind() is not None
needs_bf16 = pytest.mark.skipif(not NATIVE, reason="this CPU has no native bfloat16")


def _key(cfg):
    return cache_key(key_config(cfg, "none:seed=0"), [{"sha256": "ab", "label": 1}])


@needs_bf16
def test_bfloat16_enters_the_key_with_its_route_and_float32_keeps_its_key():
    f32 = ExtractConfig(backbone="inception_v3", weights="none")
    bf16 = ExtractConfig(backbone="inception_v3", weights="none", precision="bfloat16")
    assert "precision" not in key_config(f32, "x")  # the key every float32 cache already has
    assert {k: key_config(bf16, "x")[k] for k in ("precision", "precision_route")} == {
        "precision": "bfloat16", "precision_route": precision.ROUTES[precision.bf16_kind()]["inception_v3"]}
    assert _key(bf16) != _key(f32)


@pytest.fixture(scope="module")
def bf16_cache(mini, tmp_path_factory):
    """inception_v3 --weights none --augment 0 --precision bfloat16, through the CLI in a
    process of its own (the onednn route must start before TensorFlow)."""
    out = tmp_path_factory.mktemp("bf16")
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "extract", "--backbone", "inception_v3", "--weights",
                        "none", "--augment", "0", "--precision", "bfloat16", "--data", str(mini["cohen"]), "--data",
                        str(mini["normal"]), "--cache-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@needs_bf16
@pytest.mark.slow  # a bfloat16 extraction (its graph built in a fresh process): about a minute with the next
def test_a_bfloat16_cache_records_it_and_its_features_are_float32s_within_a_cosine(bf16_cache, mini_cache):
    from covfeat.store.reader import open_cache

    bf, f32 = open_cache(bf16_cache), open_cache(mini_cache)  # mini_cache: the same images in float32
    assert (bf.config["precision"], bf.config["precision_route"]) == (
        "bfloat16", precision.ROUTES[precision.bf16_kind()]["inception_v3"])
    assert "precision" not in f32.config
    want = {sha: i for i, sha in enumerate(f32.manifest["sha256"])}
    rows = np.flatnonzero(bf.has_features())
    order = [want[bf.manifest["sha256"][r]] for r in rows]
    a = bf.read_features(bf.originals(rows)).reshape(len(order), -1).astype(np.float64)
    b = f32.read_features(f32.originals(order)).reshape(len(order), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert len(order) >= 10 and cos.min() >= 0.999, cos.min()
    assert not np.array_equal(a, b)  # computed in bfloat16 indeed


def test_bfloat16_is_refused_in_one_line_on_a_cpu_without_it(mini, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    r = runner.invoke(app, ["extract", "--backbone", "inception_v3", "--weights", "none", "--precision", "bfloat16",
                            "--data", str(mini["cohen"]), "--data", str(mini["normal"])])
    assert r.exit_code == 1
    assert r.stderr.strip() == ("error: --precision bfloat16: this CPU has no native bfloat16 arithmetic (neither "
                                "avx512_bf16 nor amx_bf16 in /proc/cpuinfo), where it is slower than float32; extract "
                                "with --precision float32.")


def test_a_float32_extraction_refuses_a_bfloat16_onednn_mode_in_its_environment(mini, tmp_path, monkeypatch):
    """A user's ONEDNN_DEFAULT_FPMATH_MODE=BF16 would make float32 features in bfloat16 under a float32 key."""
    monkeypatch.setenv(precision.FPMATH_ENV, "BF16")
    r = runner.invoke(app, ["extract", "--backbone", "inception_v3", "--weights", "none", "--augment", "0", "--data",
                            str(mini["cohen"]), "--data", str(mini["normal"]), "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "error: ONEDNN_DEFAULT_FPMATH_MODE=BF16 is set in this process, so oneDNN would compute the float32 route "
        "in another precision than its cache records; unset it and run again.")


@needs_bf16
@pytest.mark.slow  # a bfloat16 extraction (its graph built in a fresh process): about a minute with the next
def test_predict_computes_in_the_runs_precision(bf16_cache, tmp_path):
    """A run on a bfloat16 cache predicts through the same route: the backbone's maps of an
    image are the cached ones (float16-stored), and p_covid the head's on them."""
    from conftest import fit

    from covfeat.head.fit import fit_head
    from covfeat.head.runs import Run
    from covfeat.store.reader import open_cache
    from covfeat.use.predict import Predictor

    run_dir = fit_head(bf16_cache, fit(2), tmp_path / "runs", progress=False)
    fc = open_cache(bf16_cache)
    rows = np.flatnonzero(fc.has_features())[:4]
    paths = [fc.manifest["path"][r] for r in rows]
    cached = fc.read_features(fc.originals(rows))
    pr = Predictor(run_dir)
    assert pr.route == fc.config["precision_route"]
    maps = pr.backbone.predict(np.stack([pr.pipeline(p) for p in paths]), verbose=0)
    assert np.abs(maps - cached).max() <= 2e-3 * np.abs(cached).max()  # float16 storage; float32's differ ~1%
    want = Run(run_dir).load_head().predict(cached, verbose=0)[:, 1]
    np.testing.assert_allclose(pr.p_covid(np.stack([pr.pipeline(p) for p in paths])), want, atol=2e-3)


@needs_bf16
@pytest.mark.slow  # shares the bfloat16 cache above (built once per session)
def test_grad_cam_computes_in_the_runs_precision(bf16_cache, tmp_path):
    """explain and the gradcam probe rebuild the run's backbone in the route its cache was extracted
    in: the maps they take gradients through are the cached (bfloat16) ones, not float32's."""
    from conftest import fit

    from covfeat.head.fit import fit_head
    from covfeat.head.runs import Run
    from covfeat.probes.gradcam import Measurer
    from covfeat.store.reader import open_cache

    run_dir = fit_head(bf16_cache, fit(2), tmp_path / "runs", progress=False)
    fc = open_cache(bf16_cache)
    rows = np.flatnonzero(fc.has_features())[:4]
    paths = [fc.manifest["path"][r] for r in rows]
    cached = fc.read_features(fc.originals(rows))
    m = Measurer.for_run(Run(run_dir), fc)
    maps = m.backbone.predict(np.stack([m.pipeline(p) for p in paths]), verbose=0)
    assert np.abs(maps - cached).max() <= 2e-3 * np.abs(cached).max()  # float32's maps differ ~1%
    want = Run(run_dir).load_head().predict(cached, verbose=0)[:, 1]
    got = [r["p_covid"] for r in m.measure(paths)]
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("route", precision.MIXED_ROUTES)
@pytest.mark.parametrize("name", list(precision.ROUTES["avx512_bf16"]))
def test_every_backbone_traces_to_allowed_ops_by_the_mixed_routes(name, route):
    import tensorflow as tf

    from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights
    from covfeat.extraction.graphops import unlisted

    bb = get_backbone(name)
    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0, route=route)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, 224, 224, 3])])
    concrete = fn.get_concrete_function()
    assert unlisted(concrete.function_def) is None
    assert concrete.outputs[0].dtype == tf.float32
    ops = {n.op for n in concrete.function_def.node_def}
    assert ("FusedBatchNormV3" in ops) == (route == "mixed_fused_bn")


@pytest.mark.parametrize("scale", [True, False])
def test_the_fused_batchnorm_route_normalises_as_keras_does_with_real_statistics(scale, tmp_path):
    """A random-init backbone's BatchNormalizations are identities (mean 0, variance 1, scale 1,
    offset 0), so its fidelity cannot see how the ``mixed_fused_bn`` route normalises.  Here a
    convolution, a BatchNormalization with random statistics (and without a scale, as the
    Inception backbones) and a ReLU, under the mixed policy: through fuse_batchnorm, Keras's own
    outputs within one bfloat16 rounding, the statistics used at float32 (rounding them to
    bfloat16 first, or dropping epsilon, fails this), and the same weights; saved in a ``.keras``
    file (as ``export --format keras`` does), covfeat's loader reads it back."""
    import keras

    from covfeat.extraction.precision import build_policy, fuse_batchnorm

    rng = np.random.default_rng(0)
    with build_policy("mixed"):
        x = keras.Input((8, 8, 16))
        y = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv")(x)
        y = keras.layers.BatchNormalization(scale=scale, epsilon=1.001e-5, name="bn")(y)
        model = keras.Model(x, keras.layers.Activation("relu")(y))
    bn = model.get_layer("bn")
    stats = ([rng.uniform(0.5, 2.0, 32)] if scale else []) + [rng.normal(0, 1, 32), rng.normal(0, 3, 32),
                                                             rng.uniform(1e-4, 0.01, 32)]
    bn.set_weights([s.astype(np.float32) for s in stats])
    fused = fuse_batchnorm(model)
    assert type(fused.get_layer("bn")).__name__ == "FusedBatchNormalization"
    import tensorflow as tf

    traced = tf.function(lambda z: fused(z, training=False)).get_concrete_function(tf.TensorSpec([None, 8, 8, 16]))
    assert "FusedBatchNormV3" in {n.op for n in traced.function_def.node_def}  # the fused kernel runs, not Keras's
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), fused.get_weights()))
    data = rng.normal(0, 3, (4, 8, 8, 16)).astype(np.float32)
    want = np.asarray(model(data, training=False), np.float64)
    got = np.asarray(fused(data, training=False), np.float64)
    assert fused(data, training=False).dtype.name == "bfloat16"
    assert np.abs(want).max() > 10  # the statistics move the maps: mean, variance and scale all matter
    assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 1e-6), np.abs(got - want).max()
    # a --format keras export holds the layer: covfeat's loader reads it back in a fresh process
    # (where nothing has registered the class yet), computing the same
    fused.save(tmp_path / "fused.keras")
    np.save(tmp_path / "data.npy", data)
    code = ("import sys, numpy as np; from covfeat.use.keras_layers import load_exported; "
            "m = load_exported(sys.argv[1]); assert type(m.get_layer('bn')).__name__ == 'FusedBatchNormalization'; "
            "np.save(sys.argv[3], np.asarray(m(np.load(sys.argv[2]), training=False), np.float64))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fused.keras"), str(tmp_path / "data.npy"),
                        str(tmp_path / "again.npy")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "again.npy"), got)
