"""The backbone registry and the weights paths: imagenet through Keras's cache, FILE, none."""

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import covfeat.extraction.backbones as backbones
from covfeat.core.errors import WeightsUnavailable
from covfeat.extraction.backbones import REGISTRY, build_backbone, get_backbone, list_backbones, resolve_weights


def test_registry_holds_the_papers_four():
    assert list_backbones() == ["inception_v3", "inception_resnet_v2", "densenet201", "resnet101_v2"]
    assert {n: b.dropout for n, b in REGISTRY.items()} == {
        "inception_v3": 0.5, "inception_resnet_v2": 0.2, "densenet201": 0.5, "resnet101_v2": 0.2}


# inception_v3's shape in the default suite (most tests extract with it); the other three (4-6 s
# each) behind slow, as every test that builds them is
@pytest.mark.parametrize("name", [n if n == "inception_v3" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in list_backbones()])
def test_declared_feature_shape_matches_a_real_forward_pass(name):
    bb = get_backbone(name)
    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0)
    out = model(np.zeros((1, 224, 224, 3), np.float32), training=False)
    assert tuple(out.shape[1:]) == bb.feature_shape
    assert not model.trainable


def test_random_init_is_seeded():
    bb = get_backbone("inception_v3")
    a = build_backbone(bb, resolve_weights(bb, "none", seed=3), seed=3).get_weights()[0]
    b = build_backbone(bb, resolve_weights(bb, "none", seed=3), seed=3).get_weights()[0]
    c = build_backbone(bb, resolve_weights(bb, "none", seed=4), seed=4).get_weights()[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _legacy_weights_file(path, seed=7):
    """A weights file of our own, in the legacy HDF5 layout Keras's ImageNet files use."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    bb = get_backbone("inception_v3")
    model = build_backbone(bb, resolve_weights(bb, "none", seed=seed), seed=seed)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model


def _offline(monkeypatch):
    # Every download goes to a closed local port: fails at once, like an offline machine.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def test_offline_without_cached_weights_names_the_file_and_folder(monkeypatch, mini):
    _offline(monkeypatch)
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "extract", "--backbone", "densenet201",
                        "--data", str(mini["cohen"]), "--data", str(mini["normal"])],
                       capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in r.stderr
    home = os.environ["KERAS_HOME"]
    assert err[0].startswith("error: ImageNet weights for densenet201 are not cached and could not be downloaded")
    assert "Put densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5 (from https://storage.googleapis.com/" in err[0]
    assert f"in {home}/models/, or pass --weights FILE or --weights none." in err[0]
    assert r.stdout == ""  # stopped before reading any data


def test_a_foreign_file_in_kerass_cache_is_refused_not_deleted(monkeypatch, tmp_path):
    _offline(monkeypatch)
    target = backbones.keras_cache_dir() / get_backbone("inception_v3").imagenet.file
    target.parent.mkdir(parents=True)
    _legacy_weights_file(target)
    with pytest.raises(WeightsUnavailable, match=r"is not the published ImageNet weights for inception_v3 \(md5 "):
        resolve_weights(get_backbone("inception_v3"), "imagenet")
    assert target.exists()


def test_imagenet_path_loads_a_file_found_in_kerass_cache(monkeypatch, tmp_path):
    """The real imagenet path (Keras's get_file, its cache, its hash check) on a file we made."""
    _offline(monkeypatch)
    bb = get_backbone("inception_v3")
    target = backbones.keras_cache_dir() / bb.imagenet.file
    target.parent.mkdir(parents=True)
    made = _legacy_weights_file(target, seed=7)
    md5 = hashlib.md5(target.read_bytes()).hexdigest()
    fake = dataclasses.replace(bb, imagenet=dataclasses.replace(bb.imagenet, md5=md5))
    spec = resolve_weights(fake, "imagenet")
    assert spec.kind == "imagenet" and spec.pretrained and spec.path == str(target)
    model = build_backbone(fake, spec, seed=0)  # seed 0 would give other random weights
    np.testing.assert_array_equal(model.get_weights()[0], made.get_weights()[0])


def test_weights_file_identity_is_its_hash(tmp_path):
    f = tmp_path / "mine.h5"
    _legacy_weights_file(f)
    spec = resolve_weights(get_backbone("inception_v3"), str(f))
    assert spec.identity == "file:sha256=" + hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(WeightsUnavailable, match="no such file; expected 'imagenet', 'none' or the path"):
        resolve_weights(get_backbone("inception_v3"), str(tmp_path / "nope.h5"))


def _tiny_build(input_shape):
    import keras

    inp = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 4, strides=4, activation="relu")(inp)  # 56 x 56
    return keras.Model(inp, keras.layers.AveragePooling2D(8)(x), name="tiny")  # 7 x 7 x 8


def test_a_backbone_added_by_one_registration_runs_end_to_end(monkeypatch, mini, tmp_path):
    """extract, fit-head, predict and export with a new backbone and no other edit."""
    from typer.testing import CliRunner

    from covfeat.cli import app
    from covfeat.extraction.backbones import Backbone, Scaling
    from covfeat.head.runs import Run
    from covfeat.use.predict import Predictor, load_exported

    monkeypatch.setitem(REGISTRY, "tiny", Backbone("tiny", _tiny_build, Scaling("tiny", 255.0, -0.5), (7, 7, 8), 0.3))
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "--backbone", "tiny", "--weights", "none", "--augment", "1",
                            "--preprocess", "backbone", "--data", str(mini["cohen"]), "--data", str(mini["normal"])])
    assert r.exit_code == 0, r.output
    cache = r.stdout.strip().splitlines()[-1]
    assert Path(cache).name.startswith("tiny-none-")
    r = runner.invoke(app, ["fit-head", "--cache", cache, "--epochs", "3", "--val", "0.2"])
    assert r.exit_code == 0, r.output
    run = Run(r.stdout.strip().splitlines()[-1])
    assert run.fit_config().head.dropout == 0.3  # the registry's dropout, resolved into the run
    imgs = sorted((mini["cohen"] / "images").iterdir())[:3]
    r = runner.invoke(app, ["predict", "--run", str(run.path), *map(str, imgs)])
    assert r.exit_code == 0, r.output
    assert len([l for l in r.stdout.splitlines() if l.endswith(("COVID-19", "NORMAL"))]) == 3
    r = runner.invoke(app, ["export", "--run", str(run.path), "--out", str(tmp_path / "tiny.keras")])
    assert r.exit_code == 0, r.output
    model = load_exported(tmp_path / "tiny.keras")
    pr = Predictor(run.path)
    x = np.stack([pr.pipeline.decode(p) for p in imgs])
    probs, _ = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs[:, 1], pr.p_covid(np.stack([pr.pipeline(p) for p in imgs])), atol=1e-5)
    # the export's scaling layers are the registry's: x / 255 - 0.5
    np.testing.assert_allclose(np.asarray(model.get_layer("preprocess_tiny")(x[:1])), x[:1] / 255.0 - 0.5, atol=1e-6)


def test_recorded_weights_rebuild_only_from_the_same_file(tmp_path):
    """One function turns a cache's recorded weights into a --weights argument, for predict and
    the audit alike: a file is taken only while it holds the bytes extraction hashed."""
    from covfeat.extraction.backbones import weights_from_config

    f = tmp_path / "mine.weights.h5"
    f.write_bytes(b"weights as extracted")
    stored = {"weights": {"kind": "file", "identity": "file:sha256=" + hashlib.sha256(f.read_bytes()).hexdigest()}}
    assert weights_from_config(stored, str(f), "predict") == str(f)
    assert weights_from_config({"weights": {"kind": "none"}}, None, "predict") == "none"
    assert weights_from_config({"weights": {"kind": "imagenet"}}, None, "predict") == "imagenet"
    f.write_bytes(b"weights trained further")
    with pytest.raises(WeightsUnavailable, match=rf"^{f} has changed since extraction \(its hash differs\); refusing "
                                                 r"to audit the run with other weights\.$"):
        weights_from_config(stored, str(f), "audit the run")
    f.unlink()
    with pytest.raises(WeightsUnavailable, match=r"is gone; put it back to predict\.$"):
        weights_from_config(stored, str(f), "predict")
