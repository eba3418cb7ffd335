"""Dropout followed by global average pooling, computed for a whole epoch at once (numba).

The paper's head begins Dropout -> GlobalAveragePooling2D on the pre-pool map.  The
dropout masks do not depend on the head's weights, so a whole epoch's
``mean_s(x * mask / (1 - rate))`` can be computed before its gradient steps: one pass
over the maps per epoch in compiled code instead of one tensor op per batch in Python.
The maths is unchanged: each element is kept independently with probability
``1 - rate`` (``rate`` held to 24 binary digits, as fine as float32's uniform draw in
Keras's own dropout) and scaled by ``1 / (1 - rate)``.

Numba is used because this loop is the whole cost of a cached-feature epoch
(7 x 7 x 1920 maps x ~1,000 rows x 100 epochs = 9e9 multiply-adds) and numpy would need
a temporary array as large as the epoch for the masks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_Q_BITS = 24
_LUT = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float32)


@njit(inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _keep_word(state, q, low):
    """64 independent Bernoulli(q / 2**24) bits, by comparing 64 bit-sliced uniforms to q."""
    result = np.uint64(0)
    undecided = ~np.uint64(0)
    for b in range(_Q_BITS - 1, low - 1, -1):
        state += _GOLDEN
        r = _mix(state)
        if (q >> b) & 1:
            result |= undecided & ~r  # uniform bit 0 where q has 1: below q, keep
            undecided &= r
        else:
            undecided &= ~r  # uniform bit 1 where q has 0: above q, drop
        if undecided == np.uint64(0):
            break
    return result, state  # lanes still undecided equal q so far: not below q, drop


@njit(parallel=True, cache=True)
def dropout_pool(pool, rows, views, rate_q, seed, epoch, out):
    """out[i] = mean over positions of dropout(pool[rows[i], views[i]]).

    Parameters
    ----------
    pool : (R, V, S, C) float32 maps, S = H * W
    rows, views : (n,) int64, which map of the pool each output row uses
    rate_q : int, keep probability times 2**24 (2**24 means no dropout)
    seed, epoch : int, the masks are a pure function of (seed, epoch, i, s)
    out : (n, C) float32, overwritten
    """
    n = rows.shape[0]
    S = pool.shape[2]
    C = pool.shape[3]
    q = np.uint64(rate_q)
    low = 0
    while low < _Q_BITS and not (q >> low) & 1:
        low += 1
    full = rate_q >= (1 << _Q_BITS)
    scale = np.float32(1.0) / np.float32(S)
    if not full:
        scale = np.float32(1.0 / (S * (rate_q / float(1 << _Q_BITS))))
    for i in prange(n):
        acc = np.zeros(C, np.float32)
        r = rows[i]
        v = views[i]
        for s in range(S):
            x = pool[r, v, s]
            if full:
                for c in range(C):
                    acc[c] += x[c]
                continue
            state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
            for c0 in range(0, C, 64):
                w, state = _keep_word(state, q, low)
                m = min(64, C - c0)
                if m == 64:
                    # byte -> 8 floats through a table: an 8-wide multiply the compiler vectorises
                    for k in range(8):
                        row = _LUT[(w >> np.uint64(8 * k)) & np.uint64(255)]
                        base = c0 + 8 * k
                        for j in range(8):
                            acc[base + j] += x[base + j] * row[j]
                else:
                    for j in range(m):
                        acc[c0 + j] += x[c0 + j] * np.float32((w >> np.uint64(j)) & np.uint64(1))
        for c in range(C):
            out[i, c] = acc[c] * scale


def keep_q(rate: float) -> int:
    """Keep probability 1 - rate as an integer numerator over 2**24."""
    return int(round((1.0 - rate) * (1 << _Q_BITS)))
