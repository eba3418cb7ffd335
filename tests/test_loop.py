"""The epoch loop computes exactly what Keras's fit computes, and draws fresh views and order."""

import numpy as np
import pytest

from covfeat.head.config import HeadConfig
from covfeat.head.loop import MemorySource, epoch_plan, train
from covfeat.head.model import build_head, compile_head, one_hot, pooled_mean

# Settings under which every term of the head's gradient matters: a partial last batch
# (45 = 5 x 8 + 5), class weights, activity L1/L2 strong enough to move the weights, a large
# learning rate and momentum.
N, C = 45, 64
STRONG = dict(epochs=3, seed=1, dropout=0.0, batch_size=8, learning_rate=0.05, momentum=0.9, activity_l1=0.02,
              activity_l2=0.02)
TOL = 2e-5


def _data():
    rng = np.random.default_rng(0)
    lab = (np.arange(N) % 3 == 0).astype(int)  # 15 COVID-19, 30 NORMAL: class weights differ
    maps = rng.standard_normal((N, 3, 3, C)).astype(np.float32) + lab[:, None, None, None] * 0.3
    maps = maps.astype(np.float16).astype(np.float32)
    weights = (N / (2.0 * np.bincount(lab)))[lab].astype(np.float32)
    return maps, lab, weights


def _fast(cfg, maps, lab, weights, source=None):
    fast, tail = build_head((3, 3, C), cfg)
    init = fast.get_weights()
    hist = train(source or MemorySource(maps.reshape(N, 1, 9, C)), lab, np.ones(N, np.int64), pooled_mean(maps), lab,
                 tail, cfg, sample_weight=weights)
    return hist, fast, init


@pytest.mark.parametrize("engine,sizes", [("numba", {}), ("tf", {}),
                                          ("numba", {"dense_units": 20, "batch_size": 11})])
def test_fast_training_equals_keras_fit(engine, sizes):
    """Same rows, same order: every epoch's loss, accuracy and validation numbers, and every
    weight of the head afterwards, equal keras.Model.fit of the full head on the maps.  The
    odd sizes take the kernel's other paths: units beyond the last 16-lane block, and
    batches of more than the 8 rows it holds in registers."""
    maps, lab, weights = _data()
    cfg = HeadConfig(engine=engine, **{**STRONG, **sizes})
    hist, fast, init = _fast(cfg, maps, lab, weights)
    ref, _ = build_head((3, 3, C), cfg)
    ref.set_weights(init)
    compile_head(ref, cfg)
    for e, (order, _) in enumerate(epoch_plan(cfg.seed, cfg.epochs, N, np.ones(N, np.int64))):
        h = ref.fit(maps[order], one_hot(lab[order]), sample_weight=weights[order], batch_size=cfg.batch_size,
                    epochs=1, shuffle=False, verbose=0, validation_data=(maps, one_hot(lab)))
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert hist[e][k] == pytest.approx(h.history[k][0], abs=TOL), (e, k)
    for mine, theirs in zip(fast.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(mine, theirs, atol=TOL)


def test_the_equivalence_test_is_sensitive_to_every_term(monkeypatch):
    """Without the activity regularisers, or without the class weights, or with the last
    batch dropped, the weights move far more than the tolerance above: a kernel that forgot
    any of them would fail the Keras comparison."""
    import covfeat.head.loop as loop

    maps, lab, weights = _data()
    _, base, _ = _fast(HeadConfig(**STRONG), maps, lab, weights)
    variants = {
        "no activity regularisation": (HeadConfig(**{**STRONG, "activity_l1": 0.0, "activity_l2": 0.0}), weights),
        "no class weights": (HeadConfig(**STRONG), np.ones(N, np.float32)),
    }
    gaps = {}
    for name, (cfg, w) in variants.items():
        _, other, _ = _fast(cfg, maps, lab, w)
        gaps[name] = max(float(np.abs(a - b).max()) for a, b in zip(base.get_weights(), other.get_weights()))
    # A kernel that drops each epoch's partial last batch (45 = 5 x 8 + 5: its 5 rows never
    # step) is the numba engine fed only the epoch's first 40 rows.
    full = N - N % STRONG["batch_size"]
    epoch = loop._NumbaEngine.epoch
    monkeypatch.setattr(loop._NumbaEngine, "epoch", lambda self, x, y, w: epoch(self, x[:full], y[:full], w[:full]))
    _, other, _ = _fast(HeadConfig(**STRONG), maps, lab, weights)
    monkeypatch.undo()
    gaps["last batch dropped"] = max(float(np.abs(a - b).max()) for a, b in zip(base.get_weights(),
                                                                                other.get_weights()))
    for name, gap in gaps.items():
        assert gap > 100 * TOL, name


@pytest.mark.parametrize("engine", ["numba", "tf"])
def test_fast_training_with_dropout_equals_keras_fit_on_the_same_masks(engine):
    """Dropout > 0: covfeat draws each epoch's masks itself (a pure function of seed, epoch,
    position in the epoch and map position: covfeat.head.dropout.mask_row) and pools the
    masked maps before the batch steps.  Keras fit on the same maps, masked with those very
    masks and scaled by 1 / (1 - rate), through the same head with its Dropout layer at 0,
    gives every epoch's numbers and the final weights: covfeat's dropout is Keras's
    inverted dropout, with the same keep rate and scaling, ahead of the same pooling."""
    from covfeat.head.dropout import keep_q, mask_row

    maps, lab, weights = _data()
    rate = 0.5
    cfg = HeadConfig(engine=engine, **{**STRONG, "dropout": rate})
    hist, fast, init = _fast(cfg, maps, lab, weights)
    plain = HeadConfig(engine=engine, **{**STRONG, "dropout": 0.0})
    ref, _ = build_head((3, 3, C), plain)
    ref.set_weights(init)
    compile_head(ref, plain)
    q, S = keep_q(rate), 9
    kept = 0.0
    for e, (order, _) in enumerate(epoch_plan(cfg.seed, cfg.epochs, N, np.ones(N, np.int64))):
        mask = np.stack([np.stack([mask_row(cfg.seed, e, i, S, s, C, q) for s in range(S)]) for i in range(N)])
        kept += mask.mean() / cfg.epochs
        x = maps[order] * mask.reshape(N, 3, 3, C) / np.float32(1 - rate)
        h = ref.fit(x, one_hot(lab[order]), sample_weight=weights[order], batch_size=cfg.batch_size, epochs=1,
                    shuffle=False, verbose=0, validation_data=(maps, one_hot(lab)))
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert hist[e][k] == pytest.approx(h.history[k][0], abs=TOL), (e, k)
    for mine, theirs in zip(fast.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(mine, theirs, atol=TOL)
    assert kept == pytest.approx(1 - rate, abs=0.01)  # the masks are dropout's, not all ones


def test_numba_and_tf_engines_agree_with_dropout():
    """With dropout, both engines train on the same pooled rows (the same masks): the same
    losses and weights.  Keras's own Dropout keeps the same share with the same scaling."""
    import keras

    maps, lab, weights = _data()
    views = np.stack([maps, maps * 1.1], 1).reshape(N, 2, 9, C)  # two views per row
    runs = {}
    for engine in ("numba", "tf"):
        cfg = HeadConfig(**{**STRONG, "dropout": 0.5, "engine": engine})
        fast, tail = build_head((3, 3, C), cfg)
        hist = train(MemorySource(views), lab, np.full(N, 2, np.int64), pooled_mean(maps), lab, tail, cfg,
                     sample_weight=weights)
        runs[engine] = (hist, fast.get_weights())
    for a, b in zip(runs["numba"][0], runs["tf"][0]):
        for k in ("loss", "accuracy", "val_loss"):
            assert a[k] == pytest.approx(b[k], abs=TOL)
    for a, b in zip(runs["numba"][1], runs["tf"][1]):
        np.testing.assert_allclose(a, b, atol=TOL)
    ones = np.ones((200, 49, 64), np.float32)
    out = np.asarray(keras.layers.Dropout(0.5, seed=3)(ones, training=True))
    assert set(np.unique(out)) == {0.0, 2.0} and (out > 0).mean() == pytest.approx(0.5, abs=0.01)


def test_each_epoch_draws_fresh_views_and_order():
    n_views = np.array([5] * 300 + [1] * 20)
    plan = epoch_plan(0, 4, 320, n_views)
    for order, views in plan:
        assert sorted(order) == list(range(320))
        assert (views < n_views[order]).all() and (views >= 0).all()
        assert set(views[n_views[order] == 5]) == {0, 1, 2, 3, 4}
    assert not np.array_equal(plan[0][1], plan[1][1]) and not np.array_equal(plan[0][0], plan[1][0])


def test_the_head_steps_flush_subnormals_and_give_the_caller_its_arithmetic_back():
    """A momentum below 1.2e-38 becomes zero inside the steps (an Intel core slows down a hundredfold
    on every subnormal), the weights come out as without the flush, and the calling thread computes
    subnormals again afterwards."""
    from covfeat.head.kernels import _X86, _head_epoch, head_epoch

    if not _X86:
        pytest.skip("the flush is x86's MXCSR")
    rng = np.random.default_rng(0)
    n, H = 16, 32
    X = rng.random((n, C), dtype=np.float32)
    X[:, 0] = 0.0  # channel 0 never active: its momenta only decay (x 0.5 a step)
    Y = one_hot((np.arange(n) % 2).astype(int))
    SW = np.ones(n, np.float32)

    def state():
        r = np.random.default_rng(1)
        P = (r.standard_normal((C, H)).astype(np.float32) * 0.1, np.zeros(H, np.float32), np.ones(H, np.float32),
             np.zeros(H, np.float32), np.zeros(H, np.float32), np.ones(H, np.float32),
             r.standard_normal((H, 2)).astype(np.float32) * 0.1, np.zeros(2, np.float32))
        M = tuple(np.zeros_like(P[i]) for i in (0, 1, 2, 3, 6, 7))
        M[0][0] = 3e-38  # two steps (x 0.25) take it below the smallest normal float
        return P, M

    consts = (np.float32(1e-4), np.float32(0.5), np.float32(0.0), np.float32(0.0), np.float32(1e-3),
              np.float32(0.99), np.float32(1e-7))
    P, M = state()
    head_epoch(X, Y, SW, P, M, 8, *consts)
    P0, M0 = state()
    _head_epoch(X, Y, SW, P0, M0, 8, *consts)
    assert (M0[0][0] != 0).all() and (np.abs(M0[0][0]) < 1.2e-38).all()  # without the flush: subnormal
    assert (M[0][0] == 0).all()
    for a, b in zip(P, P0):
        np.testing.assert_array_equal(a, b)
    tiny = np.array([1e-38], np.float32)
    assert (tiny * np.float32(0.25))[0] != 0  # this thread's arithmetic is its own again
    with pytest.raises(Exception):  # a kernel that raises (wrong argument types) hands it back too
        head_epoch(X, Y, SW, P, M, 8, *consts[:-1], "not a number")
    assert (tiny * np.float32(0.25))[0] != 0
