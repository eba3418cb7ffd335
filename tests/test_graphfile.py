"""Extraction loads the backbone's traced graph and weights from covfeat's graph cache instead
of building the model with Keras each run (covfeat.extraction.graphfile); the features stay the same."""

import h5py
import numpy as np
import pytest

import covfeat.extraction.graphfile as graphfile
from covfeat.extraction.backbones import get_backbone, resolve_weights
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.graphfile import WEIGHTS, backbone_forward, graph_key
from covfeat.extraction.run import extract


def _keras_reference(bb, spec, x):
    import tensorflow as tf

    from covfeat.extraction.backbones import build_backbone

    model = build_backbone(bb, spec, seed=0)
    return tf.function(lambda b: model(b, training=False))(x).numpy()


def _scrambled_weights(bb, path):
    """A weights file in which every variable differs from every other (random init leaves
    inception_v3's batch-norm statistics all 0 or all 1, where two swapped would not show)."""
    from covfeat.extraction.backbones import build_backbone

    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0)
    rng = np.random.default_rng(7)
    model.set_weights([(w * rng.uniform(0.5, 1.5, w.shape) + rng.normal(0, 0.05, w.shape)).astype(w.dtype)
                       for w in model.get_weights()])
    model.save_weights(path)
    return path


def test_the_cached_graph_gives_kerass_features_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    bb = get_backbone("inception_v3")
    spec = resolve_weights(bb, str(_scrambled_weights(bb, tmp_path / "scrambled.weights.h5")))
    built = backbone_forward(bb, spec, seed=0)
    loaded = backbone_forward(bb, spec, seed=0)
    assert (built.source, loaded.source) == ("keras", "cache")
    x = np.random.default_rng(1).random((5, 224, 224, 3), dtype=np.float32) * 2 - 1
    want = _keras_reference(bb, spec, x)
    assert np.array_equal(built(x).numpy(), want)
    assert np.array_equal(loaded(x).numpy(), want)
    assert np.array_equal(loaded(x[:2]).numpy(), want[:2])  # any batch size


def test_a_second_extraction_loads_the_graph_and_writes_the_same_features(mini, tmp_path, monkeypatch):
    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1)
    first = extract([mini["cohen"], mini["normal"]], cfg, tmp_path / "a", progress=False)

    def no_keras(*a, **k):
        raise AssertionError("the backbone was built with Keras although its graph is cached")

    monkeypatch.setattr(graphfile, "build_backbone", no_keras)
    second = extract([mini["cohen"], mini["normal"]], cfg, tmp_path / "b", progress=False)
    with h5py.File(first) as a, h5py.File(second) as b:
        assert a["features"].shape == b["features"].shape
        assert np.array_equal(a["features"][:], b["features"][:])


def test_a_damaged_graph_is_built_again_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    bb = get_backbone("inception_v3")
    spec = resolve_weights(bb, "none")
    backbone_forward(bb, spec, seed=0)
    (weights,) = (tmp_path / "graphs").glob(f"*/{WEIGHTS}")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit of one weight
    weights.write_bytes(bytes(data))
    again = backbone_forward(bb, spec, seed=0)
    assert again.source == "keras"
    assert "is unusable (checksum differs); building it with Keras and keeping it again" in capsys.readouterr().err
    assert backbone_forward(bb, spec, seed=0).source == "cache"  # and kept again, whole


def test_an_unwritable_graph_cache_is_a_note_not_a_failure(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(blocker / "graphs"))
    bb = get_backbone("inception_v3")
    fwd = backbone_forward(bb, resolve_weights(bb, "none"), seed=0)
    assert fwd.source == "keras"
    assert "note: cannot keep the backbone graph in" in capsys.readouterr().err
    assert fwd(np.zeros((1, 224, 224, 3), np.float32)).shape == (1, *bb.feature_shape)


@pytest.mark.parametrize("change", ["seed", "weights", "backbone"])
def test_the_graph_key_separates_what_changes_the_graph_or_its_weights(change, tmp_path):
    bb = get_backbone("inception_v3")
    base = graph_key(bb, resolve_weights(bb, "none"), 0)[0]
    if change == "seed":
        other = graph_key(bb, resolve_weights(bb, "none", seed=1), 1)[0]
    elif change == "weights":
        f = tmp_path / "w.weights.h5"
        f.write_bytes(b"weights")
        other = graph_key(bb, resolve_weights(bb, str(f)), 0)[0]
    else:
        other = graph_key(get_backbone("densenet201"), resolve_weights(get_backbone("densenet201"), "none"), 0)[0]
    assert other != base


@pytest.mark.slow  # 10 s; the default suite keeps the damaged graph (rebuilt with its note) and the unwritable cache
def test_a_cached_graph_that_cannot_run_is_built_again(tmp_path, monkeypatch, capsys):
    import tensorflow as tf

    from covfeat.extraction.work import ShardComputer

    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    bb = get_backbone("inception_v3")
    spec = resolve_weights(bb, "none")
    backbone_forward(bb, spec, seed=0)
    real_load = graphfile._load

    def unrunnable(folder, what):
        real_load(folder, what)

        def call(batch):
            raise tf.errors.InvalidArgumentError(None, None, "Input to reshape is a tensor with 9216 values")
        return call

    monkeypatch.setattr(graphfile, "_load", unrunnable)
    computer = ShardComputer(ExtractConfig(backbone="inception_v3", weights="none"), bb, spec)
    assert computer._forward.source == "keras"
    assert "is unusable (Input to reshape is a tensor with 9216 values); building it with Keras" in \
        capsys.readouterr().err


def test_an_older_entry_of_the_same_backbone_and_weights_is_removed(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("COVFEAT_GRAPH_CACHE", str(tmp_path / "graphs"))
    bb = get_backbone("inception_v3")
    spec = resolve_weights(bb, "none")
    key, what = graph_key(bb, spec, 0)
    for name, changes in (("older", {"keras": "0.0"}), ("other-seed", {"seed": 1})):
        (tmp_path / "graphs" / name).mkdir(parents=True)
        (tmp_path / "graphs" / name / "layout.json").write_text(json.dumps({"what": {**what, **changes}}))
    backbone_forward(bb, spec, seed=0)
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == sorted([key, "other-seed"])
