"""A vectorizable float32 exp for Numba kernels.

Without Intel SVML, Numba compiles ``np.exp`` to a scalar libm call per element, which dominated the
kernels that use it. This Cephes-style expf (range reduction by ln 2, a degree-6 polynomial, 2^n built
in the exponent bits) inlines into the caller's loop, vectorizes, and is accurate to about 2 ulp.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.vec16 import F32X16, I32X16, const16


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are the low 32 of the integer ``bits``: a register bitcast (an array
    ``.view`` costs ~80 ns a call in Numba). Numba types int32 arithmetic as int64, hence the trunc."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@njit(inline="always")
def exp_f32(x):
    """``exp(x)`` for ``-87 <= x <= 0`` (float32)."""
    n = np.int32(x * np.float32(1.44269504) - np.float32(0.5))  # round(x / ln 2); x <= 0
    nf = np.float32(n)
    r = x - nf * np.float32(0.693359375) + nf * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _float_from_bits((n + np.int32(127)) << np.int32(23))


def exp_neg16(builder, x):
    """``exp_f32`` on 16 float32 lanes (``-87 <= x <= 0``) for intrinsics' codegen: the same steps, its
    multiply-adds fused (as LLVM fuses them in ``exp_f32``'s loops), in portable vector IR (AVX2
    targets split it in halves)."""
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32X16, [F32X16] * 3), "llvm.fma.v16f32")
    n = builder.fptosi(builder.fsub(builder.fmul(x, const16(1.44269504)), const16(0.5)), I32X16)
    nf = builder.sitofp(n, F32X16)
    r = builder.call(fma, [nf, const16(-0.693359375), x])
    r = builder.call(fma, [nf, const16(2.12194440e-4), r])
    e = exp_poly16(builder, fma, r)
    two_n = builder.bitcast(builder.shl(builder.add(n, const16(127, I32X16)), const16(23, I32X16)), F32X16)
    return builder.fmul(e, two_n)


def exp_poly16(builder, fma, r):
    """``e^r`` for the reduced ``|r| <= ln 2 / 2`` on 16 lanes: ``exp_f32``'s polynomial, its steps
    fused multiply-adds (``fma``: the ``llvm.fma.v16f32`` function)."""
    p = const16(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = builder.call(fma, [p, r, const16(c)])
    return builder.fadd(builder.call(fma, [builder.fmul(p, r), r, r]), const16(1.0))
