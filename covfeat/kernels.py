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

The inner steps are written as LLVM vector IR (numba ``@intrinsic``) rather than left to
the auto-vectoriser, which turned the float16 widening and the per-lane mask into about
five scalar-ish cycles per element: 16 lanes at a time, float16 widened by ``fpext``
(F16C), the dropout word's bits used directly as a lane mask, and the head's dense-layer
sums held in registers.  Each multiply and add stays a separate IEEE operation in the
scalar loop's order (no fusion, no reassociation), so the numbers are those of the plain
loops, bit for bit, whatever the CPU's vector width.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

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


_LANES = 16  # channels per vector step: one 16-bit slice of a 64-bit dropout word


def _vector_codegen(n_src):
    """LLVM IR for acc[c0:c0+16] += sum over sources of select(mask, float32(src[c0:c0+16]), 0) * w.

    float16 sources (uint16 bit patterns) are widened with LLVM's ``fpext half -> float``,
    which is exact and becomes one hardware conversion (F16C vcvtph2ps on x86-64); the
    16 mask bits become a ``<16 x i1>`` select (an AVX-512 mask register, or a compare on
    AVX2).  Multiplies and adds are separate IEEE operations (no fusion), in the order
    ``(x_a * w_a + x_b * w_b)`` then ``acc + that``, so results do not depend on the CPU.
    """

    def codegen(context, builder, sig, args):
        acc_t = sig.args[0]
        acc_v, c0 = args[0], args[1]
        srcs = args[2:2 + n_src]
        mask = args[2 + n_src]
        weights = args[3 + n_src:]
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, _LANES)
        accp = builder.gep(context.make_array(acc_t)(context, builder, acc_v).data, [c0])
        accp = builder.bitcast(accp, vf.as_pointer())
        m = builder.bitcast(builder.trunc(mask, ir.IntType(_LANES)), ir.VectorType(ir.IntType(1), _LANES))
        total = None
        for k in range(n_src):
            st = sig.args[2 + k]
            p = builder.gep(context.make_array(st)(context, builder, srcs[k]).data, [c0])
            if st.dtype == types.uint16:
                vh = ir.VectorType(ir.HalfType(), _LANES)
                x = builder.fpext(builder.load(builder.bitcast(p, vh.as_pointer()), align=2), vf)
            else:
                x = builder.load(builder.bitcast(p, vf.as_pointer()), align=4)
            x = builder.select(m, x, ir.Constant(vf, None))
            if weights:
                w = builder.insert_element(ir.Constant(vf, ir.Undefined), weights[k], ir.Constant(ir.IntType(32), 0))
                w = builder.shuffle_vector(w, ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), _LANES), None))
                x = builder.fmul(x, w)
            total = x if total is None else builder.fadd(total, x)
        builder.store(builder.fadd(builder.load(accp, align=4), total), accp, align=4)
        return context.get_dummy_value()

    return codegen


def _check_vector_args(acc, srcs):
    ok = isinstance(acc, types.Array) and acc.dtype == types.float32 and acc.layout == "C" and acc.ndim == 1
    return ok and all(isinstance(s, types.Array) and s.ndim == 1 and s.layout == "C"
                      and s.dtype in (types.uint16, types.float32) for s in srcs)


@intrinsic
def _acc_masked(typingctx, acc, c0, src, mask):
    """acc[c0:c0+16] += select(bits of mask, float32(src[c0:c0+16]), 0)."""
    if not _check_vector_args(acc, [src]):
        return None
    return types.void(acc, types.intp, src, types.uint64), _vector_codegen(1)


@intrinsic
def _acc_masked_pair(typingctx, acc, c0, src_a, src_b, mask, wa, wb):
    """acc[c0:c0+16] += select(mask, src_a) * wa + select(mask, src_b) * wb (one SMOTE row)."""
    if not _check_vector_args(acc, [src_a, src_b]):
        return None
    return types.void(acc, types.intp, src_a, src_b, types.uint64, types.float32, types.float32), _vector_codegen(2)


@njit(inline="always")
def _to_f32(h):
    """One float16 bit pattern (uint16) -> float32, exactly (for the channels after the last
    full 64: sign, exponent and mantissa moved to float32's places, times 2**112)."""
    v = np.uint32(h)
    bits = np.empty(1, np.uint32)
    bits[0] = ((v & np.uint32(0x8000)) << np.uint32(16)) | ((v & np.uint32(0x7FFF)) << np.uint32(13))
    return bits.view(np.float32)[0] * np.float32(5.192296858534828e33)  # 2**112


def _elem(src, c):
    """src[c] as float32 (overloaded per dtype below)."""


@overload(_elem, inline="always")
def _elem_impl(src, c):
    if src.dtype == types.uint16:
        return lambda src, c: _to_f32(src[c])
    return lambda src, c: np.float32(src[c])


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

    Per position, each 64-bit dropout word covers 64 channels as four 16-lane vector steps
    (:func:`_acc_masked`): widen, select the kept lanes, accumulate, in channel order.  Every
    value is the exactly converted float16 (times the SMOTE weight), kept or zeroed, summed
    over positions in order, so the result is the same on every CPU.
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
    ones = ~np.uint64(0)
    lane = np.uint64(0xFFFF)
    body = C - C % 64
    for i in prange(n):
        acc = np.zeros(C, np.float32)
        r = rows[i]
        v = views[i]
        syn = r >= n_real
        j = r - n_real if syn else 0
        wa = np.float32(weights[j, 0]) if syn else np.float32(1.0)
        wb = np.float32(weights[j, 1]) if syn else np.float32(0.0)
        ra = parents[j, 0] if syn else r
        rb = parents[j, 1] if syn else r
        for s in range(S):
            state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
            src = pool[ra, v, s]
            src_b = pool[rb, v, s]
            for c0 in range(0, body, 64):
                w = ones
                if not full:
                    w, state = _keep_word(state, q, low)
                if syn:
                    for k in range(4):
                        _acc_masked_pair(acc, c0 + 16 * k, src, src_b, (w >> np.uint64(16 * k)) & lane, wa, wb)
                else:
                    for k in range(4):
                        _acc_masked(acc, c0 + 16 * k, src, (w >> np.uint64(16 * k)) & lane)
            if body < C:  # channels beyond the last full word of 64
                w = ones
                if not full:
                    w, state = _keep_word(state, q, low)
                for jj in range(C - body):
                    keep = np.float32((w >> np.uint64(jj)) & np.uint64(1))
                    if syn:
                        acc[body + jj] += (_elem(src, body + jj) * keep) * wa + (_elem(src_b, body + jj) * keep) * wb
                    else:
                        acc[body + jj] += _elem(src, body + jj) * keep
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


@njit(parallel=True, cache=True, nogil=True)
def _no_inf_nan(bits, exp_mask):
    """True when no element has every exponent bit set (inf or NaN), rows in parallel."""
    bad = np.zeros(bits.shape[0], np.bool_)
    for i in prange(bits.shape[0]):
        row = bits[i]
        hit = False
        for j in range(row.shape[0]):
            hit |= (row[j] & exp_mask) == exp_mask
        bad[i] = hit
    return not bad.any()


def all_finite(a: np.ndarray) -> bool:
    """np.isfinite(a).all() for float16 / float32 arrays, from the bit patterns in compiled
    code (numpy's float16 isfinite is emulated: 0.8 s for a 450 MB pool, this ~20 ms)."""
    a = np.ascontiguousarray(a)
    if a.size == 0:
        return True
    if a.dtype == np.float16:
        return bool(_no_inf_nan(a.reshape(len(a), -1).view(np.uint16), np.uint16(0x7C00)))
    if a.dtype == np.float32:
        return bool(_no_inf_nan(a.reshape(len(a), -1).view(np.uint32), np.uint32(0x7F800000)))
    return bool(np.isfinite(a).all())


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


_ROWS = 8  # rows of the first dense layer's forward pass held in vector registers at once


def _ptr(context, builder, ty, val):
    ary = context.make_array(ty)(context, builder, val)
    return ary.data, cgutils.unpack_tuple(builder, ary.shape)


def _splat(builder, x, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), vt.count), None))


def _vload(builder, base, offset, vt):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vt.as_pointer()), align=4)


def _vstore(builder, value, base, offset):
    builder.store(value, builder.bitcast(builder.gep(base, [offset]), value.type.as_pointer()), align=4)


def _f32_matrices(*arrs):
    return all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C" for a in arrs)


@intrinsic
def _dense_rows(typingctx, X, a, B, W, j0, Z, z0):
    """Z[z0 + k, j0:j0+16] = sum over i, in order, of X[a + k, i] * W[i, j0:j0+16], k < min(B, 8).

    Up to 8 rows' 16-lane sums stay in vector registers while W's rows stream past once;
    each step is a separate multiply and add (no fusion), in the order of a plain loop over
    i, so the sums are those of the scalar loop, bit for bit, on every CPU.
    """
    if not _f32_matrices(X, W, Z):
        return None
    sig = types.void(X, types.intp, types.intp, W, types.intp, Z, types.intp)

    def codegen(context, builder, sg, args):
        Xv, av, Bv, Wv, j0v, Zv, z0v = args
        vf = ir.VectorType(ir.FloatType(), _LANES)
        xp, (_, C) = _ptr(context, builder, sg.args[0], Xv)
        wp, (_, H) = _ptr(context, builder, sg.args[3], Wv)
        zp, _ = _ptr(context, builder, sg.args[5], Zv)
        last = builder.sub(Bv, ir.Constant(Bv.type, 1))
        rows, accs = [], []
        for k in range(_ROWS):
            kk = ir.Constant(Bv.type, k)
            rk = builder.select(builder.icmp_signed("<", kk, last), kk, last)  # rows past B repeat the last
            rows.append(builder.gep(xp, [builder.mul(builder.add(av, rk), C)]))
            acc = cgutils.alloca_once(builder, vf)
            builder.store(ir.Constant(vf, None), acc)
            accs.append(acc)
        with cgutils.for_range(builder, C) as loop:
            i = loop.index
            w = _vload(builder, wp, builder.add(builder.mul(i, H), j0v), vf)
            for k in range(_ROWS):
                x = _splat(builder, builder.load(builder.gep(rows[k], [i])), vf)
                builder.store(builder.fadd(builder.load(accs[k]), builder.fmul(x, w)), accs[k])
        for k in range(_ROWS):
            kk = ir.Constant(Bv.type, k)
            with builder.if_then(builder.icmp_signed("<", kk, Bv)):
                _vstore(builder, builder.load(accs[k]), zp, builder.add(builder.mul(builder.add(z0v, kk), H), j0v))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _dense_grad_step(typingctx, X, a, B, D, W, M, j0, mom, lr):
    """For every input channel i: g = sum over k < B, in order, of X[a + k, i] * D[k, j0:j0+16];
    M[i, j0:j0+16] = mom * M - lr * g; W[i, j0:j0+16] += M (SGD with momentum on the first
    dense kernel, 16 units at a time; separate multiplies and adds, as the scalar loop)."""
    if not _f32_matrices(X, D, W, M):
        return None
    sig = types.void(X, types.intp, types.intp, D, W, M, types.intp, types.float32, types.float32)

    def codegen(context, builder, sg, args):
        Xv, av, Bv, Dv, Wv, Mv, j0v, momv, lrv = args
        vf = ir.VectorType(ir.FloatType(), _LANES)
        xp, (_, C) = _ptr(context, builder, sg.args[0], Xv)
        dp, (_, HD) = _ptr(context, builder, sg.args[3], Dv)
        wp, (_, H) = _ptr(context, builder, sg.args[4], Wv)
        mp, _ = _ptr(context, builder, sg.args[5], Mv)
        vmom, vlr = _splat(builder, momv, vf), _splat(builder, lrv, vf)
        g = cgutils.alloca_once(builder, vf)
        small = builder.icmp_signed("<=", Bv, ir.Constant(Bv.type, _ROWS))
        last = builder.sub(Bv, ir.Constant(Bv.type, 1))
        def unrolled(full):
            """Up to 8 rows: their 16 lanes of D held in registers; with ``full`` all 8 are
            rows of the batch, otherwise rows past B are skipped."""
            rows, ds, live = [], [], []
            for k in range(_ROWS):
                kk = ir.Constant(Bv.type, k)
                rk = kk if full else builder.select(builder.icmp_signed("<", kk, last), kk, last)
                rows.append(builder.gep(xp, [builder.mul(builder.add(av, rk), C)]))
                ds.append(_vload(builder, dp, builder.add(builder.mul(rk, HD), j0v), vf))
                live.append(builder.icmp_signed("<", kk, Bv))
            with cgutils.for_range(builder, C) as loop:
                i = loop.index
                acc = ir.Constant(vf, None)
                for k in range(_ROWS):
                    x = _splat(builder, builder.load(builder.gep(rows[k], [i])), vf)
                    step = builder.fadd(acc, builder.fmul(x, ds[k]))
                    acc = step if full else builder.select(live[k], step, acc)
                _momentum(builder, acc, i, H, j0v, wp, mp, vmom, vlr, vf)

        with builder.if_else(small) as (few, general):
            with few:
                with builder.if_else(builder.icmp_signed("==", Bv, ir.Constant(Bv.type, _ROWS))) as (eight, fewer):
                    with eight:
                        unrolled(True)
                    with fewer:
                        unrolled(False)
            with general:
                with cgutils.for_range(builder, C) as loop:
                    i = loop.index
                    builder.store(ir.Constant(vf, None), g)
                    with cgutils.for_range(builder, Bv) as kl:
                        k = kl.index
                        x = _splat(builder, builder.load(builder.gep(xp, [builder.add(builder.mul(builder.add(av, k), C), i)])), vf)
                        d = _vload(builder, dp, builder.add(builder.mul(k, HD), j0v), vf)
                        builder.store(builder.fadd(builder.load(g), builder.fmul(x, d)), g)
                    _momentum(builder, builder.load(g), i, H, j0v, wp, mp, vmom, vlr, vf)
        return context.get_dummy_value()

    return sig, codegen


def _momentum(builder, g, i, H, j0v, wp, mp, vmom, vlr, vf):
    """M = mom * M - lr * g; W += M on W[i, j0:j0+16]."""
    off = builder.add(builder.mul(i, H), j0v)
    m = builder.fsub(builder.fmul(vmom, _vload(builder, mp, off, vf)), builder.fmul(vlr, g))
    _vstore(builder, m, mp, off)
    _vstore(builder, builder.fadd(_vload(builder, wp, off, vf), m), wp, off)


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
    H16 = H - H % _LANES
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
        for k0 in range(0, B, _ROWS):
            for j0 in range(0, H16, _LANES):
                _dense_rows(X, a + k0, min(_ROWS, B - k0), W1, j0, z1, k0)
        if H16 < H:  # units after the last full 16
            for k in range(B):
                for j in range(H16, H):
                    z1[k, j] = 0.0
            for i in range(C):
                for k in range(B):
                    xv = X[a + k, i]
                    for j in range(H16, H):
                        z1[k, j] += xv * W1[i, j]
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
        for j0 in range(0, H16, _LANES):
            _dense_grad_step(X, a, B, dz1, W1, mW1, j0, mom, lr)
        if H16 < H:
            for i in range(C):
                w = W1[i]
                m = mW1[i]
                for j in range(H16, H):
                    gW[j] = 0.0
                for k in range(B):
                    xv = X[a + k, i]
                    for j in range(H16, H):
                        gW[j] += xv * dz1[k, j]
                for j in range(H16, H):
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
