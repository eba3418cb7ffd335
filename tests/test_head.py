"""The head is the paper's, and the fast trainer computes exactly what Keras's fit computes."""

import numpy as np
import pytest

from covfeat.backbones import get_backbone, list_backbones
from covfeat.config import HeadConfig
from covfeat.head import build_head, compile_head, one_hot, pooled_mean, probability_bce
from covfeat.kernels import NO_PARENTS, dropout_pool, keep_q
from covfeat.loop import MemorySource, epoch_plan, train


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
    import keras

    p = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    y = np.array([[1, 0], [1, 0]], np.float32)
    want = -np.mean(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1))
    assert float(probability_bce()(y, p)) == pytest.approx(want, rel=1e-6)
    # Keras 3's own BinaryCrossentropy on a softmax layer's output is another number:
    logits = keras.Input((2,))
    m = keras.Model(logits, keras.layers.Activation("softmax")(logits))
    z = np.log(p)
    assert float(keras.losses.BinaryCrossentropy()(y, m(z))) != pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("engine", ["numba", "tf"])
def test_fast_training_equals_keras_fit(engine):
    """Same rows, same order, no dropout: every epoch's loss and accuracy and the final
    predictions match keras.Model.fit of the full head on the maps."""
    rng = np.random.default_rng(0)
    n, C = 48, 64
    maps = rng.standard_normal((n, 3, 3, C)).astype(np.float32) + (np.arange(n) % 2)[:, None, None, None] * 0.3
    lab = np.arange(n) % 2
    cfg = HeadConfig(epochs=3, seed=1, engine=engine, dropout=0.0)
    fast, tail = build_head((3, 3, C), cfg)
    ref, _ = build_head((3, 3, C), cfg)
    ref.set_weights(fast.get_weights())
    pool = maps.astype(np.float16).astype(np.float32).reshape(n, 1, 9, C)
    hist = train(MemorySource(pool), lab, np.ones(n, np.int64), pooled_mean(maps), lab, tail, cfg)
    compile_head(ref, cfg)
    plan = epoch_plan(cfg.seed, cfg.epochs, n, np.ones(n, np.int64))
    src = pool.reshape(n, 3, 3, C)
    for e, (order, _) in enumerate(plan):
        h = ref.fit(src[order], one_hot(lab[order]), batch_size=8, epochs=1, shuffle=False, verbose=0,
                    validation_data=(maps, one_hot(lab)))
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert hist[e][k] == pytest.approx(h.history[k][0], abs=2e-5), (e, k)
    np.testing.assert_allclose(fast.predict(maps, verbose=0), ref.predict(maps, verbose=0), atol=2e-5)


def test_dropout_keeps_the_right_share_and_is_seeded():
    S, C = 49, 1920
    ones = np.ones((6, 1, S, C), np.float32)
    out = np.empty((6, C), np.float32)
    for rate in (0.5, 0.2):
        dropout_pool(ones, np.arange(6), np.zeros(6, np.int64), keep_q(rate), 1, 0, out, *NO_PARENTS, 6)
        kept = out * (1 - rate)  # share of the 49 positions kept, per channel
        assert kept.mean() == pytest.approx(1 - rate, abs=0.005)
        # inverted dropout: the expectation is unchanged
        assert out.mean() == pytest.approx(1.0, abs=0.01)
    a, b, c = (np.empty((6, C), np.float32) for _ in range(3))
    dropout_pool(ones, np.arange(6), np.zeros(6, np.int64), keep_q(0.5), 1, 0, a, *NO_PARENTS, 6)
    dropout_pool(ones, np.arange(6), np.zeros(6, np.int64), keep_q(0.5), 1, 0, b, *NO_PARENTS, 6)
    dropout_pool(ones, np.arange(6), np.zeros(6, np.int64), keep_q(0.5), 1, 1, c, *NO_PARENTS, 6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_float16_pool_is_converted_exactly_and_smote_rows_mix_parents():
    h = np.arange(65536, dtype=np.uint16).view(np.float16)
    vals = h[np.isfinite(h)][:64 * 992]  # all 63,488 finite float16 values
    pool = vals.reshape(992, 1, 1, 64)
    out = np.empty((992, 64), np.float32)
    dropout_pool(pool.view(np.uint16), np.arange(992), np.zeros(992, np.int64), keep_q(0.0), 0, 0, out,
                 *NO_PARENTS, 992)
    np.testing.assert_array_equal(out, vals.reshape(992, 64).astype(np.float32))
    par = np.array([[3, 7]], np.int64)
    w = np.array([[0.25, 0.75]], np.float32)
    one = np.empty((1, 64), np.float32)
    dropout_pool(pool.view(np.uint16), np.array([992]), np.zeros(1, np.int64), keep_q(0.0), 0, 0, one, par, w, 992)
    f = pool.astype(np.float32)
    np.testing.assert_allclose(one[0], f[3, 0, 0] * np.float32(0.25) + f[7, 0, 0] * np.float32(0.75), rtol=1e-6)


def test_each_epoch_draws_fresh_views_and_order():
    n_views = np.array([5] * 300 + [1] * 20)
    plan = epoch_plan(0, 4, 320, n_views)
    for order, views in plan:
        assert sorted(order) == list(range(320))
        assert (views < n_views[order]).all() and (views >= 0).all()
        assert set(views[n_views[order] == 5]) == {0, 1, 2, 3, 4}
    assert not np.array_equal(plan[0][1], plan[1][1]) and not np.array_equal(plan[0][0], plan[1][0])


@pytest.mark.parametrize("C,rate", [(1920, 0.5), (1930, 0.2), (50, 0.5)])
def test_dropout_pool_equals_a_plain_numpy_reference(C, rate):
    """Mean over positions of mask * map / (1 - rate), SMOTE rows mixed first, float16 input."""
    from covfeat.kernels import mask_row

    rng = np.random.default_rng(1)
    S = 9
    pool = rng.standard_normal((4, 2, S, C)).astype(np.float16)
    par = np.array([[1, 3], [0, 2]], np.int64)
    w = np.array([[0.3, 0.7], [0.9, 0.1]], np.float32)
    rows, views = np.array([2, 4, 0, 5]), np.array([1, 0, 0, 1])
    out = np.empty((4, C), np.float32)
    dropout_pool(pool.view(np.uint16), rows, views, keep_q(rate), 7, 3, out, par, w, 4)
    f = pool.astype(np.float32)
    for i, (r, v) in enumerate(zip(rows, views)):
        maps = f[r, v] if r < 4 else f[par[r - 4, 0], v] * w[r - 4, 0] + f[par[r - 4, 1], v] * w[r - 4, 1]
        masks = np.stack([mask_row(7, 3, i, S, s, C, keep_q(rate)) for s in range(S)])
        want = (maps * masks).sum(0) / (S * (1 - rate))
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)
