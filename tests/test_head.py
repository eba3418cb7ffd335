"""The head is the paper's: its layers, hyperparameters and loss."""

import numpy as np
import pytest

from covfeat.extraction.backbones import get_backbone, list_backbones
from covfeat.head.config import HeadConfig
from covfeat.head.model import build_head, compile_head, probability_bce


@pytest.mark.parametrize("name", list_backbones())
def test_head_layers_and_hyperparameters_are_the_papers(name):
    import keras

    bb = get_backbone(name)
    cfg = HeadConfig().resolved(bb)
    model, _ = build_head(bb.feature_shape, cfg)
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds == ["InputLayer", "Dropout", "GlobalAveragePooling2D", "Dense", "BatchNormalization", "Dense"]
    drop, dense, out = model.layers[1], model.layers[3], model.layers[5]
    assert drop.rate == {"inception_v3": 0.5, "densenet201": 0.5, "resnet101_v2": 0.2, "inception_resnet_v2": 0.2}[name]
    assert dense.units == 128 and dense.activation.__name__ == "relu"
    assert out.units == 2 and out.activation.__name__ == "softmax"
    for layer in (dense, out):
        reg = layer.activity_regularizer
        assert isinstance(reg, keras.regularizers.L1L2) and (reg.l1, reg.l2) == pytest.approx((1e-3, 1e-3))
    assert model.input_shape[1:] == bb.feature_shape
    assert (cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.momentum) == (100, 8, 1e-4, 0.5)
    compile_head(model, cfg)
    opt = model.optimizer
    assert type(opt).__name__ == "SGD" and float(opt.learning_rate) == pytest.approx(1e-4)
    assert opt.momentum == 0.5 and not opt.nesterov


def test_probability_bce_is_cross_entropy_of_the_probabilities():
    p = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    y = np.array([[1, 0], [1, 0]], np.float32)
    want = -np.mean(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1))
    assert float(probability_bce()(y, p)) == pytest.approx(want, rel=1e-6)


def test_the_compiled_head_trains_on_the_cross_entropy_of_its_own_probabilities():
    """covfeat's claim (the "loss" deviation): the head's loss is the binary cross-entropy of
    the softmax probabilities it outputs, even though that output carries the logits Keras 3
    would otherwise use (sigmoid cross-entropy of the logits).  The loss the compiled head
    reports on its own outputs equals the hand computation on its predicted probabilities."""
    from dataclasses import replace

    from covfeat.head.model import one_hot

    cfg = replace(HeadConfig(), dropout=0.0, activity_l1=0.0, activity_l2=0.0)  # the loss alone
    model, _ = build_head((3, 3, 16), cfg)
    compile_head(model, cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 3, 16)).astype(np.float32) * 4  # confident outputs: the two losses differ
    y = one_hot(np.arange(32) % 2)
    p = np.clip(model.predict(x, verbose=0), 1e-7, 1 - 1e-7)
    want = -np.mean(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1))
    got = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)["loss"]
    assert got == pytest.approx(want, rel=1e-5)
