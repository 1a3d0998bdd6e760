"""A greedy head's store that also screens: each logit's error bound folded in as it is written.

``q8_0_rescore`` finds a row's argmax from approximate logits ``v`` and their error bounds ``e`` (see
there): it needs the row's largest lower bound ``max (v - e)`` and, per chunk of columns, the largest
upper bound ``max (v + e)``. Found by a second pass, that reads 32 rows x 49k logits (6 MB) back from
memory; here the head kernel computes them from the registers it stores, per panel of 48 columns
(``COLS``), into ``lows [M, N/48]`` and ``highs [M, N/48]``. With the store itself vectorized too
(it was a scalar loop), SmolLM2's byte head and its re-scoring take 2.4 ms for 32 greedy rows where
they took 3.2-3.3 (cold caches, 2 threads, hidden states from chat decoding).

``e = x_n err_norm[n] + act_n w_norm[n] + |v| 2^-7``, with the row norms of ``q8_0.row_norms``:
the same bound ``q8_0_rescore`` takes, rounded in its own order (both are bounds with room to spare).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr
from edgellm.kernels.cpu.q8_0 import APPROX_OUT_REL, _approx_error
from edgellm.kernels.cpu.vec16 import F32X16, const16, splat

COLS = 48  # columns a store covers: three 16-lane vectors, a panel of ``int8_head_vnni``


def bounds16(builder, val, x_n, err_norm, act_n, w_norm):
    """For intrinsics' codegen: ``(v - e, v + e)`` of 16 lanes of logits ``val``, ``e = x_n err_norm +
    act_n w_norm + |v| 2^-7`` (each argument 16 float32 lanes), in this order of operations."""
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32X16, [F32X16]), "llvm.fabs.v16f32")
    e = builder.fadd(builder.fadd(builder.fmul(x_n, err_norm), builder.fmul(act_n, w_norm)),
                     builder.fmul(builder.call(fabs, [val]), const16(APPROX_OUT_REL)))
    return builder.fsub(val, e), builder.fadd(val, e)


def _f32_arrays(*ts) -> bool:
    return all(isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C" for t in ts)


@intrinsic
def store_screened(typingctx, cbuf, rows, scale, n0, out, r0, err_norm, w_norm, x_n, act_n, lows, highs, col):
    """``out[r0 + r, n0 + j] = v = cbuf[48 r + j] * scale[n0 + j]`` for ``r < rows``, ``j < 48``, and,
    unless ``lows`` is None, ``lows[r0 + r, col] = max_j (v - e)``, ``highs[r0 + r, col] = max_j (v +
    e)`` with ``e = x_n[r0 + r] err_norm[n0 + j] + act_n[r0 + r] w_norm[n0 + j] + |v| 2^-7``. Every
    column ``n0 + j`` must be below ``len(err_norm)`` (the caller takes ragged panels itself)."""
    screen = not isinstance(lows, types.NoneType)
    arrays = (cbuf, scale, out) + ((err_norm, w_norm, x_n, act_n, lows, highs) if screen else ())
    if not (_f32_arrays(*arrays) and all(isinstance(t, types.Integer) for t in (rows, n0, r0, col))):
        return None

    def codegen(context, builder, sig, args):
        ty = dict(zip(("cbuf", "rows", "scale", "n0", "out", "r0", "en", "wn", "xn", "an", "lows", "highs", "col"),
                      zip(sig.args, args)))
        f32, i64 = ir.FloatType(), ir.IntType(64)
        v16f = ir.VectorType(f32, 16)
        c = lambda v: ir.Constant(i64, v)  # noqa: E731

        def int64(name):
            t, v = ty[name]
            return context.cast(builder, v, t, types.int64)

        def ptr(name, index, pointee, offset=0):
            t, v = ty[name]
            return element_ptr(context, builder, t, v, index, types.int64, pointee, offset)

        def fn(name, ret, params):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)

        vmax = fn("llvm.maxnum.v16f32", v16f, [v16f, v16f])
        hmax = fn("llvm.vector.reduce.fmax.v16f32", f32, [v16f])
        n0, r0 = int64("n0"), int64("r0")
        n_cols = context.cast(builder, builder.extract_value(context.make_array(ty["out"][0])(
            context, builder, ty["out"][1]).shape, 1), types.intp, types.int64)
        scale = [builder.load(ptr("scale", n0, v16f, 16 * v), align=4) for v in range(3)]
        if screen:
            en = [builder.load(ptr("en", n0, v16f, 16 * v), align=4) for v in range(3)]
            wn = [builder.load(ptr("wn", n0, v16f, 16 * v), align=4) for v in range(3)]
            h_cols = context.cast(builder, builder.extract_value(context.make_array(ty["lows"][0])(
                context, builder, ty["lows"][1]).shape, 1), types.intp, types.int64)
        with cgutils.for_range(builder, int64("rows")) as loop:
            r = loop.index
            row = builder.add(r0, r)
            lo = hi = None
            if screen:
                xn = splat(builder, builder.load(ptr("xn", row, f32)))
                an = splat(builder, builder.load(ptr("an", row, f32)))
            for v in range(3):
                acc = builder.load(ptr("cbuf", builder.mul(r, c(COLS)), v16f, 16 * v), align=4)
                val = builder.fmul(acc, scale[v])
                builder.store(val, ptr("out", builder.add(builder.mul(row, n_cols), n0), v16f, 16 * v), align=4)
                if screen:
                    low, high = bounds16(builder, val, xn, en[v], an, wn[v])
                    lo = low if lo is None else builder.call(vmax, [lo, low])
                    hi = high if hi is None else builder.call(vmax, [hi, high])
            if screen:
                at = builder.add(builder.mul(row, h_cols), int64("col"))
                builder.store(builder.call(hmax, [lo]), ptr("lows", at, f32))
                builder.store(builder.call(hmax, [hi]), ptr("highs", at, f32))
        return context.get_dummy_value()

    return types.void(cbuf, rows, scale, n0, out, r0, err_norm, w_norm, x_n, act_n, lows, highs, col), codegen


@njit(cache=True)
def store_screened_ragged(cbuf, rows, cols, scale, n0, out, r0, err_norm, w_norm, x_n, act_n, lows, highs, col):
    """``store_screened`` for a panel's first ``cols`` columns, of which those from ``len(err_norm)`` on
    are stored but not screened (a panel past the vocabulary screens to -inf)."""
    for r in range(rows):
        lo = hi = np.float32(-np.inf)
        for j in range(cols):
            v = cbuf[COLS * r + j] * scale[n0 + j]
            out[r0 + r, n0 + j] = v
            if lows is not None and n0 + j < err_norm.shape[0]:
                e = _approx_error(v, err_norm[n0 + j], w_norm[n0 + j], x_n[r0 + r], act_n[r0 + r],
                                  np.float32(APPROX_OUT_REL))
                lo = max(lo, v - e)
                hi = max(hi, v + e)
        if lows is not None:
            lows[r0 + r, col] = lo
            highs[r0 + r, col] = hi
