"""The epoch loop computes exactly what Keras's fit computes, and draws fresh views and order."""

import numpy as np
import pytest

from covfeat.config import HeadConfig
from covfeat.head import build_head, compile_head, one_hot, pooled_mean
from covfeat.loop import MemorySource, epoch_plan, train


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


def test_each_epoch_draws_fresh_views_and_order():
    n_views = np.array([5] * 300 + [1] * 20)
    plan = epoch_plan(0, 4, 320, n_views)
    for order, views in plan:
        assert sorted(order) == list(range(320))
        assert (views < n_views[order]).all() and (views >= 0).all()
        assert set(views[n_views[order] == 5]) == {0, 1, 2, 3, 4}
    assert not np.array_equal(plan[0][1], plan[1][1]) and not np.array_equal(plan[0][0], plan[1][0])
