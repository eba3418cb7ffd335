"""Compiled (numba) kernels of the cached-feature head: epoch-wide dropout + pooling,
float16 -> float32 loading, and SMOTE rows for every view.

Dropout followed by global average pooling, computed for a whole epoch at once:

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
from numba import njit, prange, types
from numba.extending import overload

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_Q_BITS = 24


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


@njit(inline="always")
def _half_row(h, bits, out):
    """float16 bit patterns (uint16) -> float32, exact for zeros, subnormals and normals.

    Moving sign, exponent and mantissa into float32's places gives the value times
    2**-112 (exponent biases 15 vs 127); one multiply by 2**112 restores it, subnormals
    included.  Two branch-free passes that vectorise (the cache refuses inf/nan).
    """
    for c in range(h.shape[0]):
        v = np.uint32(h[c])
        bits[c] = ((v & np.uint32(0x8000)) << np.uint32(16)) | ((v & np.uint32(0x7FFF)) << np.uint32(13))
    f = bits.view(np.float32)
    for c in range(h.shape[0]):
        out[c] = f[c] * np.float32(5.192296858534828e33)  # 2**112


def _load_row(src, bits, out):
    """Row of the pool -> float32 (overloaded per dtype below)."""


@overload(_load_row, inline="always")
def _load_row_impl(src, bits, out):
    if src.dtype == types.uint16:
        def impl(src, bits, out):
            _half_row(src, bits, out)
    else:
        def impl(src, bits, out):
            for c in range(src.shape[0]):
                out[c] = src[c]
    return impl


def _masked_bits(src, c0, lo, hi, bits):
    """bits[c0:c0+64] = float32 bit patterns of src[c0:c0+64] (for float16, scaled by 2**-112,
    see _half_row) ANDed with the 64 dropout lanes of (lo, hi)."""


@overload(_masked_bits, inline="always")
def _masked_bits_impl(src, c0, lo, hi, bits):
    if src.dtype == types.uint16:
        def impl(src, c0, lo, hi, bits):
            for jj in range(32):
                v = np.uint32(src[c0 + jj])
                lane = np.uint32(np.int32(lo << np.uint32(31 - jj)) >> np.int32(31))
                bits[c0 + jj] = (((v & np.uint32(0x8000)) << np.uint32(16)) |
                                 ((v & np.uint32(0x7FFF)) << np.uint32(13))) & lane
            for jj in range(32):
                v = np.uint32(src[c0 + 32 + jj])
                lane = np.uint32(np.int32(hi << np.uint32(31 - jj)) >> np.int32(31))
                bits[c0 + 32 + jj] = (((v & np.uint32(0x8000)) << np.uint32(16)) |
                                      ((v & np.uint32(0x7FFF)) << np.uint32(13))) & lane
    else:
        def impl(src, c0, lo, hi, bits):
            si = src.view(np.uint32)
            for jj in range(32):
                lane = np.uint32(np.int32(lo << np.uint32(31 - jj)) >> np.int32(31))
                bits[c0 + jj] = si[c0 + jj] & lane
            for jj in range(32):
                lane = np.uint32(np.int32(hi << np.uint32(31 - jj)) >> np.int32(31))
                bits[c0 + 32 + jj] = si[c0 + 32 + jj] & lane
    return impl


def _unit(pool):
    """What _masked_bits' floats must be multiplied by: 2**112 for float16 bits, 1 for float32."""


@overload(_unit, inline="always")
def _unit_impl(pool):
    if pool.dtype == types.uint16:
        return lambda pool: np.float32(5.192296858534828e33)
    return lambda pool: np.float32(1.0)


@njit(parallel=True, cache=True, nogil=True)
def dropout_pool(pool, rows, views, rate_q, seed, epoch, out, parents, weights, n_real):
    """out[i] = mean over positions of dropout(map of rows[i], view views[i]).

    Parameters
    ----------
    pool : (R, V, S, C) uint16 holding float16 bit patterns (converted exactly on the fly,
        half the memory traffic of float32), or float32; S = H * W
    rows, views : (n,) int64; a row r >= n_real is SMOTE row j = r - n_real, whose map is
        weights[j, 0] * pool[parents[j, 0]] + weights[j, 1] * pool[parents[j, 1]]
        (same view, same dropout mask), formed on the fly so SMOTE rows cost no memory
    rate_q : int, keep probability times 2**24 (2**24 means no dropout)
    seed, epoch : int, the masks are a pure function of (seed, epoch, i, s)
    out : (n, C) float32, overwritten

    Per position, one integer pass (convert to float32 bits and AND the dropout lanes onto
    them, branch-free) and one float pass (scale back and accumulate): every value is the
    exactly converted float16 (times the SMOTE weight), kept or zeroed, summed in order.
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
    unit = _unit(pool)
    for i in prange(n):
        acc = np.zeros(C, np.float32)
        x = np.empty(C, np.float32)
        xb = np.empty(C, np.float32)
        bits = np.empty(C, np.uint32)
        bits_b = np.empty(C, np.uint32)
        scratch = np.empty(C, np.uint32)
        r = rows[i]
        v = views[i]
        syn = r >= n_real
        j = r - n_real if syn else 0
        wa = np.float32(weights[j, 0]) * unit if syn else unit
        wb = np.float32(weights[j, 1]) * unit if syn else np.float32(0.0)
        for s in range(S):
            if full:
                if not syn:
                    _load_row(pool[r, v, s], bits, x)
                else:
                    _load_row(pool[parents[j, 0], v, s], bits, x)
                    _load_row(pool[parents[j, 1], v, s], bits, xb)
                    wa0 = np.float32(weights[j, 0])
                    wb0 = np.float32(weights[j, 1])
                    for c in range(C):
                        x[c] = x[c] * wa0 + xb[c] * wb0
                for c in range(C):
                    acc[c] += x[c]
                continue
            state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
            src = pool[parents[j, 0], v, s] if syn else pool[r, v, s]
            src_b = pool[parents[j, 1], v, s] if syn else src
            for c0 in range(0, C - 63, 64):
                w, state = _keep_word(state, q, low)
                lo = np.uint32(w & np.uint64(0xFFFFFFFF))
                hi = np.uint32(w >> np.uint64(32))
                _masked_bits(src, c0, lo, hi, bits)
                if syn:
                    _masked_bits(src_b, c0, lo, hi, bits_b)
            tail = C - C % 64
            if tail < C:  # channels beyond the last full word of 64
                w, state = _keep_word(state, q, low)
                _load_row(src, scratch, x)
                _load_row(src_b, scratch, xb)
                for jj in range(C - tail):
                    keep = np.float32((w >> np.uint64(jj)) & np.uint64(1))
                    v0 = x[tail + jj] * keep
                    v1 = xb[tail + jj] * keep
                    bits[tail + jj] = 0
                    bits_b[tail + jj] = 0
                    if syn:
                        acc[tail + jj] += v0 * np.float32(weights[j, 0]) + v1 * np.float32(weights[j, 1])
                    else:
                        acc[tail + jj] += v0
            f = bits.view(np.float32)
            if syn:
                fb = bits_b.view(np.float32)
                for c in range(C):
                    acc[c] += f[c] * wa + fb[c] * wb
            else:
                for c in range(C):
                    acc[c] += f[c] * wa
        for c in range(C):
            out[i, c] = acc[c] * scale


NO_PARENTS = (np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32))


def populated_empty(shape, dtype=np.float32) -> np.ndarray:
    """np.empty whose pages the kernel maps in one call (MAP_POPULATE): first-touch page
    faults from several threads cost seconds per GB on virtual machines."""
    import mmap

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    if nbytes == 0:
        return np.empty(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=flags)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def keep_q(rate: float) -> int:
    """Keep probability 1 - rate as an integer numerator over 2**24."""
    return int(round((1.0 - rate) * (1 << _Q_BITS)))


_F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(parallel=True, cache=True, nogil=True)
def _f16_rows_into(src, dst, rows, lut):
    n, m = src.shape
    for i in prange(n):
        d = dst[rows[i]]
        s = src[i]
        for j in range(m):
            d[j] = lut[s[j]]


def f16_rows_into(src: np.ndarray, dst: np.ndarray, rows: np.ndarray) -> None:
    """dst[rows[i]] = float32(src[i]) for float16 src, exactly (numpy's own cast is ~20x slower)."""
    src2 = np.ascontiguousarray(src).reshape(len(src), -1).view(np.uint16)
    _f16_rows_into(src2, dst.reshape(len(dst), -1), np.asarray(rows, np.int64), _F16_TO_F32)


@njit(cache=True, nogil=True, fastmath=False)
def head_epoch(X, Y, SW, P, M, bs, lr, mom, l1, l2, bn_eps, bn_mom, clip_eps):
    """One epoch of the paper's head after pooling, batch by batch, in place.

    The exact maths of Keras's Dense(relu, L1L2 activity) -> BatchNormalization ->
    Dense(softmax, L1L2 activity), BinaryCrossentropy on one-hot labels (clipped
    probabilities, mean over the two outputs, sum over the batch / batch size, activity
    losses divided by the batch size) and SGD with momentum (m = mom*m - lr*g; w += m).
    ``tests/test_head.py`` checks it against ``keras.Model.fit``.

    Parameters
    ----------
    X : (n, C) pooled inputs in epoch order ; Y : (n, 2) one-hot ; SW : (n,) sample weights
    P : tuple (W1, b1, gamma, beta, moving_mean, moving_var, W2, b2), updated in place
    M : tuple of momenta for (W1, b1, gamma, beta, W2, b2), updated in place

    Returns
    -------
    (sum of batch losses x batch sizes, number of correct argmax predictions)
    """
    W1, b1, gamma, beta, mmean, mvar, W2, b2 = P
    mW1, mb1, mg, mbt, mW2, mb2 = M
    n, C = X.shape
    H = W1.shape[1]
    z1 = np.empty((bs, H), np.float32)
    a1 = np.empty((bs, H), np.float32)
    xn = np.empty((bs, H), np.float32)
    h = np.empty((bs, H), np.float32)
    dz1 = np.empty((bs, H), np.float32)
    dxn = np.empty((bs, H), np.float32)
    mu = np.empty(H, np.float32)
    var = np.empty(H, np.float32)
    inv = np.empty(H, np.float32)
    p = np.empty((bs, 2), np.float32)
    dz2 = np.empty((bs, 2), np.float32)
    gW = np.empty(H, np.float32)
    dp = np.empty(2, np.float32)
    loss_sum = 0.0
    correct = 0
    for a in range(0, n, bs):
        B = min(bs, n - a)
        fB = np.float32(B)
        # Dense 1 + relu
        for k in range(B):
            for j in range(H):
                z1[k, j] = 0.0
        for i in range(C):
            w = W1[i]
            for k in range(B):
                xv = X[a + k, i]
                zk = z1[k]
                for j in range(H):
                    zk[j] += xv * w[j]
        r1 = np.float32(0.0)
        for k in range(B):
            for j in range(H):
                z = z1[k, j] + b1[j]
                z1[k, j] = z
                v = z if z > 0 else np.float32(0.0)
                a1[k, j] = v
                r1 += l1 * abs(v) + l2 * v * v
        # BatchNormalization (training): batch mean, biased variance
        for j in range(H):
            s = np.float32(0.0)
            for k in range(B):
                s += a1[k, j]
            mu[j] = s / fB
            s2 = np.float32(0.0)
            for k in range(B):
                d = a1[k, j] - mu[j]
                s2 += d * d
            var[j] = s2 / fB
            inv[j] = np.float32(1.0) / np.sqrt(var[j] + bn_eps)
            for k in range(B):
                xn[k, j] = (a1[k, j] - mu[j]) * inv[j]
                h[k, j] = gamma[j] * xn[k, j] + beta[j]
        # Dense 2 + softmax, BCE, activity loss on the probabilities
        r2 = np.float32(0.0)
        bce = np.float32(0.0)
        for k in range(B):
            z0 = b2[0]
            zz = b2[1]
            for j in range(H):
                z0 += h[k, j] * W2[j, 0]
                zz += h[k, j] * W2[j, 1]
            mx = max(z0, zz)
            e0 = np.exp(z0 - mx)
            e1 = np.exp(zz - mx)
            p[k, 0] = e0 / (e0 + e1)
            p[k, 1] = e1 / (e0 + e1)
            if (p[k, 1] > p[k, 0]) == (Y[a + k, 1] > Y[a + k, 0]):
                correct += 1
            dots = np.float32(0.0)
            lk = np.float32(0.0)
            for c in range(2):
                pk = p[k, c]
                y = Y[a + k, c]
                pc = min(max(pk, clip_eps), np.float32(1.0) - clip_eps)
                lk += y * np.log(pc) + (np.float32(1.0) - y) * np.log(np.float32(1.0) - pc)
                g = np.float32(0.0)
                if pk >= clip_eps and pk <= np.float32(1.0) - clip_eps:
                    g = -np.float32(0.5) * (y / pc - (np.float32(1.0) - y) / (np.float32(1.0) - pc))
                g = g * SW[a + k] / fB
                sgn = np.float32(1.0) if pk > 0 else (np.float32(-1.0) if pk < 0 else np.float32(0.0))
                g += (l1 * sgn + np.float32(2.0) * l2 * pk) / fB
                dp[c] = g
                dots += g * pk
                r2 += l1 * abs(pk) + l2 * pk * pk
            bce += -np.float32(0.5) * lk * SW[a + k]
            for c in range(2):
                dz2[k, c] = p[k, c] * (dp[c] - dots)
        loss = bce / fB + r1 / fB + r2 / fB
        loss_sum += loss * B
        # Backward: Dense 2 (uses W2 before its update), BN, relu, Dense 1
        for j in range(H):
            g0 = np.float32(0.0)
            g1 = np.float32(0.0)
            dg = np.float32(0.0)
            db = np.float32(0.0)
            for k in range(B):
                dh = dz2[k, 0] * W2[j, 0] + dz2[k, 1] * W2[j, 1]
                g0 += h[k, j] * dz2[k, 0]
                g1 += h[k, j] * dz2[k, 1]
                dg += dh * xn[k, j]
                db += dh
                dxn[k, j] = dh * gamma[j]
            sd = np.float32(0.0)
            sdx = np.float32(0.0)
            for k in range(B):
                sd += dxn[k, j]
                sdx += dxn[k, j] * xn[k, j]
            for k in range(B):
                da = inv[j] / fB * (fB * dxn[k, j] - sd - xn[k, j] * sdx)
                v = a1[k, j]
                sgn = np.float32(1.0) if v > 0 else np.float32(0.0)
                da += (l1 * sgn + np.float32(2.0) * l2 * v) / fB
                dz1[k, j] = da if z1[k, j] > 0 else np.float32(0.0)
            mW2[j, 0] = mom * mW2[j, 0] - lr * g0
            mW2[j, 1] = mom * mW2[j, 1] - lr * g1
            W2[j, 0] += mW2[j, 0]
            W2[j, 1] += mW2[j, 1]
            mg[j] = mom * mg[j] - lr * dg
            gamma[j] += mg[j]
            mbt[j] = mom * mbt[j] - lr * db
            beta[j] += mbt[j]
            mmean[j] = mmean[j] * bn_mom + mu[j] * (np.float32(1.0) - bn_mom)
            mvar[j] = mvar[j] * bn_mom + var[j] * (np.float32(1.0) - bn_mom)
        for c in range(2):
            s = np.float32(0.0)
            for k in range(B):
                s += dz2[k, c]
            mb2[c] = mom * mb2[c] - lr * s
            b2[c] += mb2[c]
        for j in range(H):
            s = np.float32(0.0)
            for k in range(B):
                s += dz1[k, j]
            mb1[j] = mom * mb1[j] - lr * s
            b1[j] += mb1[j]
        for i in range(C):
            w = W1[i]
            m = mW1[i]
            for j in range(H):
                gW[j] = 0.0
            for k in range(B):  # j innermost and contiguous, so the compiler vectorises it
                xv = X[a + k, i]
                dk = dz1[k]
                for j in range(H):
                    gW[j] += xv * dk[j]
            for j in range(H):
                m[j] = mom * m[j] - lr * gW[j]
                w[j] += m[j]
    return loss_sum, correct


@njit(cache=True, nogil=True)
def head_predict(X, P, bn_eps):
    """Inference (moving statistics) of the head after pooling: (n, 2) probabilities and
    the activity-regularised loss terms are left to the caller."""
    W1, b1, gamma, beta, mmean, mvar, W2, b2 = P
    n = X.shape[0]
    H = W1.shape[1]
    out = np.empty((n, 2), np.float32)
    z = np.empty(H, np.float32)
    act = np.empty((n, H), np.float32)
    for k in range(n):
        for j in range(H):
            z[j] = b1[j]
        for i in range(X.shape[1]):
            xv = X[k, i]
            for j in range(H):
                z[j] += xv * W1[i, j]
        z0 = b2[0]
        zz = b2[1]
        for j in range(H):
            v = z[j] if z[j] > 0 else np.float32(0.0)
            act[k, j] = v
            hh = (v - mmean[j]) / np.sqrt(mvar[j] + bn_eps) * gamma[j] + beta[j]
            z0 += hh * W2[j, 0]
            zz += hh * W2[j, 1]
        mx = max(z0, zz)
        e0 = np.exp(z0 - mx)
        e1 = np.exp(zz - mx)
        out[k, 0] = e0 / (e0 + e1)
        out[k, 1] = e1 / (e0 + e1)
    return out, act


@njit(cache=True)
def mask_row(seed, epoch, i, S, s, C, rate_q):
    """The 0/1 keep mask dropout_pool draws for output row i, position s (for tests)."""
    q = np.uint64(rate_q)
    low = 0
    while low < _Q_BITS and not (q >> low) & 1:
        low += 1
    out = np.zeros(C, np.float32)
    state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
    for c0 in range(0, C, 64):
        w, state = _keep_word(state, q, low)
        for jj in range(min(64, C - c0)):
            out[c0 + jj] = np.float32((w >> np.uint64(jj)) & np.uint64(1))
    return out
