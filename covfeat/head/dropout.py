"""The head's first two layers as one compiled (numba) pass: a whole epoch's dropout +
average pooling, with SMOTE rows mixed from their parents view by view.

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


LANES = 16  # channels per vector step: one 16-bit slice of a 64-bit dropout word


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
        vf = ir.VectorType(f32, LANES)
        accp = builder.gep(context.make_array(acc_t)(context, builder, acc_v).data, [c0])
        accp = builder.bitcast(accp, vf.as_pointer())
        m = builder.bitcast(builder.trunc(mask, ir.IntType(LANES)), ir.VectorType(ir.IntType(1), LANES))
        total = None
        for k in range(n_src):
            st = sig.args[2 + k]
            p = builder.gep(context.make_array(st)(context, builder, srcs[k]).data, [c0])
            if st.dtype == types.uint16:
                vh = ir.VectorType(ir.HalfType(), LANES)
                x = builder.fpext(builder.load(builder.bitcast(p, vh.as_pointer()), align=2), vf)
            else:
                x = builder.load(builder.bitcast(p, vf.as_pointer()), align=4)
            x = builder.select(m, x, ir.Constant(vf, None))
            if weights:
                w = builder.insert_element(ir.Constant(vf, ir.Undefined), weights[k], ir.Constant(ir.IntType(32), 0))
                w = builder.shuffle_vector(w, ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), LANES), None))
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


@njit(inline="always")
def _pool_position(acc, src, src_b, state, full, q, low, body, C, syn, wa, wb):
    """One position's channels into ``acc``: dropout words drawn from ``state``, 64 channels each,
    in channel order (the body of both pooling kernels)."""
    ones = ~np.uint64(0)
    lane = np.uint64(0xFFFF)
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


@njit(inline="always")
def _keep_terms(rate_q):
    """The keep numerator as a word and its lowest set bit (what :func:`_keep_word` draws with)."""
    q = np.uint64(rate_q)
    low = 0
    while low < _Q_BITS and not (q >> low) & 1:
        low += 1
    return q, low


@njit(inline="always")
def _rate_terms(rate_q, S):
    """:func:`_keep_terms`, whether nothing is dropped, and the scale that turns a sum over S
    positions of kept values into dropout's mean."""
    q, low = _keep_terms(rate_q)
    full = rate_q >= (1 << _Q_BITS)
    scale = np.float32(1.0) / np.float32(S)
    if not full:
        scale = np.float32(1.0 / (S * (rate_q / float(1 << _Q_BITS))))
    return q, low, full, scale


@njit(inline="always")
def _row_sources(r, n_real, parents, weights):
    """Whether buffer row ``r`` is a SMOTE row, its two parent rows and their weights (a real row
    is its own parents, weights 1 and 0)."""
    syn = r >= n_real
    j = r - n_real if syn else 0
    wa = np.float32(weights[j, 0]) if syn else np.float32(1.0)
    wb = np.float32(weights[j, 1]) if syn else np.float32(0.0)
    ra = parents[j, 0] if syn else r
    rb = parents[j, 1] if syn else r
    return syn, ra, rb, wa, wb


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
    q, low, full, scale = _rate_terms(rate_q, S)
    body = C - C % 64
    for i in prange(n):
        acc = np.zeros(C, np.float32)
        r = rows[i]
        v = views[i]
        syn, ra, rb, wa, wb = _row_sources(r, n_real, parents, weights)
        for s in range(S):
            state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
            src = pool[ra, v, s]
            src_b = pool[rb, v, s]
            _pool_position(acc, src, src_b, state, full, q, low, body, C, syn, wa, wb)
        for c in range(C):
            out[i, c] = acc[c] * scale


@njit(parallel=True, cache=True, nogil=True)
def dropout_pool_mapped(files, slot, offset, S, C, rows, rate_q, seed, epoch, out, parents, weights, n_real):
    """:func:`dropout_pool` over maps read in place from mapped shard files, with the same numbers.

    Buffer row r's map (S positions of C values, float16 bit patterns or float32) is
    ``files[slot[r]][offset[r]:offset[r] + S * C]``: the rows a
    :class:`covfeat.head.loop.StreamedSource` would have copied into its buffer, read where
    they lie.  ``rows``, ``parents``, ``weights`` and ``n_real`` are as in :func:`dropout_pool`
    with one view (the drawn one) per buffer row.
    """
    n = rows.shape[0]
    q, low, full, scale = _rate_terms(rate_q, S)
    body = C - C % 64
    for i in prange(n):
        acc = np.zeros(C, np.float32)
        r = rows[i]
        syn, ra, rb, wa, wb = _row_sources(r, n_real, parents, weights)
        fa, oa = files[slot[ra]], offset[ra]
        fb, ob = files[slot[rb]], offset[rb]
        for s in range(S):
            state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
            src = fa[oa + s * C:oa + (s + 1) * C]
            src_b = fb[ob + s * C:ob + (s + 1) * C]
            _pool_position(acc, src, src_b, state, full, q, low, body, C, syn, wa, wb)
        for c in range(C):
            out[i, c] = acc[c] * scale


NO_PARENTS = (np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32))


def keep_q(rate: float) -> int:
    """Keep probability 1 - rate as an integer numerator over 2**24."""
    return int(round((1.0 - rate) * (1 << _Q_BITS)))


@njit(cache=True)
def mask_row(seed, epoch, i, S, s, C, rate_q):
    """The 0/1 keep mask dropout_pool draws for output row i, position s (for tests)."""
    q, low = _keep_terms(rate_q)
    out = np.zeros(C, np.float32)
    state = _mix(np.uint64(seed) * _GOLDEN ^ _mix(np.uint64(epoch) + _GOLDEN * np.uint64(i * S + s + 1)))
    for c0 in range(0, C, 64):
        w, state = _keep_word(state, q, low)
        for jj in range(min(64, C - c0)):
            out[c0 + jj] = np.float32((w >> np.uint64(jj)) & np.uint64(1))
    return out
