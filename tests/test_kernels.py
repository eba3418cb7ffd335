"""The numba kernels: dropout + pooling, float16 conversion and SMOTE mixing, against numpy."""

import numpy as np
import pytest

from covfeat.head.dropout import NO_PARENTS, dropout_pool, keep_q


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


@pytest.mark.parametrize("C,rate", [(1920, 0.5), (1930, 0.2), (50, 0.5)])
def test_dropout_pool_equals_a_plain_numpy_reference(C, rate):
    """Mean over positions of mask * map / (1 - rate), SMOTE rows mixed first, float16 input."""
    from covfeat.head.dropout import mask_row

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


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_finds_any_inf_or_nan_and_passes_extremes(dtype):
    from covfeat.store.rawread import all_finite

    a = np.ones((100, 7, 7, 64), dtype)
    assert all_finite(a)
    for v in (np.inf, -np.inf, np.nan):
        b = a.copy()
        b[57, 3, 2, 11] = v
        assert not all_finite(b), v
    a[0, 0, 0, :3] = [np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny / 4]
    assert all_finite(a)
