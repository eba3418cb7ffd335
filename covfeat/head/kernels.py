"""The head's batch steps and prediction as compiled kernels (numba, explicit LLVM vector code)."""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from covfeat.head.dropout import LANES

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
        vf = ir.VectorType(ir.FloatType(), LANES)
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
        vf = ir.VectorType(ir.FloatType(), LANES)
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


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

_FTZ_DAZ = 0x8040  # MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6)


def _mxcsr(builder, name, slot):
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]), name)
    builder.call(fn, [builder.bitcast(slot, i8p)])


@intrinsic
def _flush_subnormals(typingctx):
    """Make this thread's SSE/AVX arithmetic treat subnormal floats (below 1.2e-38) as zero, and
    return the control word to restore after (0 and nothing done off x86).

    An Intel core takes a microcode assist of about a hundred cycles for every subnormal result or
    operand; an AMD Zen core does not.  The head's momenta of rarely active input channels halve
    at each step (momentum 0.5) and spend a few dozen steps below 1.2e-38 before reaching zero, so
    on the reproduction set fit-head's 100 epochs took 3.15 s on an Intel Xeon against 2.40 s
    with these values flushed (``benchmarks/bench_head.py`` measures both in one run).  A subnormal momentum moves a weight of ordinary size by less than a
    billionth of its last bit, so the trained weights come out the same but for a weight that is
    itself within a subnormal of zero (tests/test_loop.py; on the reproduction set's densenet201
    maps the test predictions were identical bit for bit)."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        _mxcsr(builder, "llvm.x86.sse.stmxcsr", slot)
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, _FTZ_DAZ)), slot)
        _mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return old

    return types.uint32(), codegen


@intrinsic
def _restore_control(typingctx, word):
    """Put back the control word :func:`_flush_subnormals` returned."""
    def codegen(context, builder, sig, args):
        if _X86:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return types.void(types.uint32), codegen


@njit(cache=True, nogil=True)
def flush_subnormals():
    """:func:`_flush_subnormals` for Python callers: this thread's previous control word."""
    return _flush_subnormals()


@njit(cache=True, nogil=True)
def restore_control(word):
    """:func:`_restore_control` for Python callers."""
    _restore_control(word)


def head_epoch(X, Y, SW, P, M, bs, lr, mom, l1, l2, bn_eps, bn_mom, clip_eps):
    """One epoch of the paper's head after pooling, batch by batch, in place, with subnormal
    floats flushed to zero (:func:`_flush_subnormals`) and this thread's arithmetic restored
    after, also when the kernel raises; see :func:`_head_epoch`."""
    word = flush_subnormals()
    try:
        return _head_epoch(X, Y, SW, P, M, bs, lr, mom, l1, l2, bn_eps, bn_mom, clip_eps)
    finally:
        restore_control(word)


@njit(cache=True, nogil=True, fastmath=False)
def _head_epoch(X, Y, SW, P, M, bs, lr, mom, l1, l2, bn_eps, bn_mom, clip_eps):
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
    H16 = H - H % LANES
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
            for j0 in range(0, H16, LANES):
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
        for j0 in range(0, H16, LANES):
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
