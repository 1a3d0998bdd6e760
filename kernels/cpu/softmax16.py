"""A float32 row's softmax numerator in 16-lane AVX-512 vectors, for Numba kernels.

Numba's own loops compile to 256-bit vectors here (LLVM's tuning for these CPUs prefers them) and
keep a scalar tail; the exp and the max over a row are most of a prompt tile's vector work, so
``softmax_row`` spells them out on ``<16 x float>``:

- ``exp(x) = 2^n e^r`` with ``n = round(x / ln 2)``, ``r = x - n ln 2`` (two constants, Cody-Waite),
  ``e^r`` the polynomial of ``expf.exp_f32`` and ``2^n`` applied by ``vscalefps``, which takes a very
  negative ``n`` to zero (no clamping, no exponent arithmetic);
- the max as ``vmaxps``, the row's masked tail (keys a row may not see) as selects on its last vectors.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr
from edgellm.kernels.cpu.expf import exp_poly16
from edgellm.kernels.cpu.vec16 import F32X16, I32X16, const16, hreduce, splat

_MASKED = -1.0e4  # what a masked score reads as: exp underflows to exactly zero


def _fn(builder, name, ret, params):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)


def vec_exp(builder, x):
    """``exp(x)`` on 16 lanes for ``x <= 0``; below about -103 it is 0."""
    fma = _fn(builder, "llvm.fma.v16f32", F32X16, [F32X16] * 3)
    rnd = _fn(builder, "llvm.x86.avx512.mask.rndscale.ps.512", F32X16,
              [F32X16, ir.IntType(32), F32X16, ir.IntType(16), ir.IntType(32)])
    scalef = _fn(builder, "llvm.x86.avx512.mask.scalef.ps.512", F32X16,
                 [F32X16, F32X16, F32X16, ir.IntType(16), ir.IntType(32)])
    all_lanes, current = ir.Constant(ir.IntType(16), -1), ir.Constant(ir.IntType(32), 4)
    # nearest, precision exception suppressed
    n = builder.call(rnd, [builder.fmul(x, const16(1.44269504)), ir.Constant(ir.IntType(32), 8), x, all_lanes, current])
    r = builder.call(fma, [n, const16(-0.693359375), x])
    r = builder.call(fma, [n, const16(2.12194440e-4), r])
    e = exp_poly16(builder, fma, r)
    return builder.call(scalef, [e, n, e, all_lanes, current])


@intrinsic
def softmax_row(typingctx, s, row, limit, width):
    """``p = exp(x - max)`` over ``x = s.flat[row:row + limit]`` (float32) in place, zeros from there to
    ``row + width`` (``width`` a multiple of 16, ``limit >= 1``); returns the sum of the p."""
    if not (isinstance(s, types.Array) and s.dtype == types.float32 and s.layout == "C"
            and all(isinstance(t, types.Integer) for t in (row, limit, width))):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        row_v = context.cast(builder, args[1], sig.args[1], types.int64)
        limit_v = context.cast(builder, args[2], sig.args[2], types.int64)
        n_vec = builder.udiv(context.cast(builder, args[3], sig.args[3], types.int64), ir.Constant(i64, 16))
        n_full = builder.udiv(limit_v, ir.Constant(i64, 16))  # vectors every lane of which the row sees
        lim = splat(builder, builder.trunc(limit_v, ir.IntType(32)))
        iota = ir.Constant(I32X16, list(range(16)))

        def ptr(k):
            return element_ptr(context, builder, sig.args[0], args[0],
                               builder.add(row_v, builder.mul(k, ir.Constant(i64, 16))), types.int64, F32X16)

        def masked(k, v):  # lanes at or past ``limit`` read as _MASKED
            at = builder.add(iota, splat(builder, builder.trunc(builder.mul(k, ir.Constant(i64, 16)),
                                                                      ir.IntType(32))))
            return builder.select(builder.icmp_signed("<", at, lim), v, const16(_MASKED))

        def vmax(a, b):
            return builder.select(builder.fcmp_ordered(">", a, b), a, b)

        acc = cgutils.alloca_once_value(builder, const16(_MASKED))
        with cgutils.for_range(builder, n_full) as loop:
            builder.store(vmax(builder.load(acc), builder.load(ptr(loop.index), align=4)), acc)
        with cgutils.for_range_slice(builder, n_full, n_vec, ir.Constant(i64, 1), inc=True) as (k, _):
            builder.store(vmax(builder.load(acc), masked(k, builder.load(ptr(k), align=4))), acc)
        m = hreduce(builder, builder.load(acc), vmax)
        tot = cgutils.alloca_once_value(builder, const16(0.0))

        def step(k, mask):
            x = builder.load(ptr(k), align=4)
            p = vec_exp(builder, builder.fsub(masked(k, x) if mask else x, m))
            builder.store(p, ptr(k), align=4)
            builder.store(builder.fadd(builder.load(tot), p), tot)

        with cgutils.for_range(builder, n_full) as loop:
            step(loop.index, False)
        with cgutils.for_range_slice(builder, n_full, n_vec, ir.Constant(i64, 1), inc=True) as (k, _):
            step(k, True)
        t = hreduce(builder, builder.load(tot), builder.fadd)
        return builder.extract_element(t, ir.Constant(ir.IntType(32), 0))

    return types.float32(s, row, limit, width), codegen
