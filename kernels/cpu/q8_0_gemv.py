"""Q8_0 weights times a few rows with exact integer block sums (AVX512-BW ``vpmaddwd``): the full
logits a sampled decode step needs.

A greedy step takes only each row's argmax, which the head's int8 copy screens and ``q8_0_rescore``
makes exact. A sampled step (temperature > 0, logprobs, penalties) needs every logit, and the float32
path dequantized each row of the weight and multiplied in float32: 3.3 ms for one row of SmolLM2's
49152 x 576 head (a third of a sampled token), 22 ms for 32 rows.

Here each group of 32 activations is quantized to int16 with its own scale (``x = xs_g * xq``, 15
bits under the group's largest value: an outlier coarsens only its own group), each 32-weight
block's products with its group are summed exactly in int32 (``vpmaddwd``: 16 lanes of two
products), widened to float32 and multiplied by the block's and the group's scales into float32
lanes, and a row's 16 lanes are summed in a fixed tree at the end. Every output depends
on its own row and weight row alone, in the same order whatever the batch: batch-invariant.

Example::

    xq, xs, _ = quantize_groups_int16_f32(x)        # x float32 [M, K]
    q8_0_gemv(xq, xs, w.qs, w.d, out, 2)            # out float32 [M, N]
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.prefetch import CACHE_LINE, emit_prefetch

QK = 32  # weights per Q8_0 block: one vpmaddwd per activation row
MAX_ROWS = 8  # activation rows per pass over a chunk of weight rows: 8 float32 accumulators
N_CHUNK = 256  # weight rows per chunk (147 KB at K = 576), read from L2 by every pass after the first
PREFETCH_ROWS = 16  # weight rows ahead: one core's hardware prefetchers alone stream ~7 GB/s


@functools.cache
def supported() -> bool:
    """Whether this CPU has AVX512-BW (``vpmaddwd`` on 512 bits): Intel Skylake-SP and later, AMD Zen 4."""
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512bw") and features.get("avx512f"))


def supports(k: int) -> bool:
    """Whether rows of ``k`` weights take this kernel (whole Q8_0 blocks) on this CPU."""
    return k % QK == 0 and k > 0 and supported()


def _halves_sum(builder, v, width):
    """The sum of a float vector's ``width`` lanes, halving in a fixed order."""
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                      list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _q8_rows(typingctx, qs, d, n0, n1, xq, xs, rows, out):
    """``out[r, n] = sum_b d[n, b] xs[r, b] float(sum_{k in b} qs[n, k] xq[r, k])`` (float32) for ``n0
    <= n < n1``, ``r < rows`` (1-8: one body unrolled for each count); ``K % 32 == 0``."""
    if not isinstance(rows, types.Integer):
        return None
    if not (isinstance(qs, types.Array) and qs.dtype == types.int8 and qs.layout == "C" and qs.ndim == 2
            and isinstance(d, types.Array) and d.dtype == types.float32 and d.layout == "C" and d.ndim == 2
            and isinstance(xq, types.Array) and xq.dtype == types.int16 and xq.layout == "C"
            and isinstance(xs, types.Array) and xs.dtype == types.float32 and xs.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.float32 and out.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        t_qs, t_d, t_n0, t_n1, t_xq, t_xs, _, t_out = sig.args
        a_qs, a_d, a_n0, a_n1, a_xq, a_xs, _, a_out = args
        i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16i, v16f, v32s = ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(i16, QK)
        k = builder.extract_value(context.make_array(t_qs)(context, builder, a_qs).shape, 1)
        n_out = builder.extract_value(context.make_array(t_out)(context, builder, a_out).shape, 1)
        n0 = context.cast(builder, a_n0, t_n0, types.int64)
        n1 = context.cast(builder, a_n1, t_n1, types.int64)
        madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v32s, v32s]),
                                              "llvm.x86.avx512.pmaddw.d.512")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        blocks = builder.sdiv(k, ir.Constant(i64, QK))
        splat = ir.Constant(v16i, [0] * 16)

        def splat_of(scalar):
            one = builder.insert_element(ir.Constant(v16f, None), scalar, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(v16f, None), splat)

        def body(n_rows):
            accs = [cgutils.alloca_once(builder, v16f) for _ in range(n_rows)]
            with cgutils.for_range(builder, builder.sub(n1, n0)) as n_loop:
                n = builder.add(n0, n_loop.index)
                for acc in accs:
                    builder.store(ir.Constant(v16f, None), acc)
                row = builder.mul(n, k)
                ahead = builder.add(n, ir.Constant(i64, PREFETCH_ROWS))
                with cgutils.for_range(builder, builder.sdiv(builder.add(k, ir.Constant(i64, CACHE_LINE - 1)),
                                                             ir.Constant(i64, CACHE_LINE))) as l_loop:
                    line = builder.add(builder.mul(ahead, k), builder.mul(l_loop.index, ir.Constant(i64, CACHE_LINE)))
                    emit_prefetch(builder, element_ptr(context, builder, t_qs, a_qs, line, types.int64), 3)
                emit_prefetch(builder, element_ptr(context, builder, t_d, a_d, builder.mul(ahead, blocks), types.int64,
                                                   f32), 3)
                with cgutils.for_range(builder, blocks) as b_loop:
                    b = b_loop.index
                    off = builder.mul(b, ir.Constant(i64, QK))
                    w8 = builder.load(element_ptr(context, builder, t_qs, a_qs, builder.add(row, off), types.int64,
                                                  ir.VectorType(ir.IntType(8), QK)), align=1)
                    w = builder.sext(w8, v32s)
                    db = builder.load(element_ptr(context, builder, t_d, a_d, builder.add(builder.mul(n, blocks), b),
                                                  types.int64, f32), align=4)
                    dv = splat_of(db)
                    for r in range(n_rows):
                        xi = builder.add(builder.mul(ir.Constant(i64, r), k), off)
                        xv = builder.load(element_ptr(context, builder, t_xq, a_xq, xi, types.int64, v32s), align=2)
                        gs = builder.load(element_ptr(context, builder, t_xs, a_xs,
                                                      builder.add(builder.mul(ir.Constant(i64, r), blocks), b),
                                                      types.int64, f32), align=4)
                        sums = builder.fmul(builder.sitofp(builder.call(madd, [w, xv]), v16f), splat_of(gs))
                        builder.store(builder.call(fma, [sums, dv, builder.load(accs[r])]), accs[r])
                for r in range(n_rows):
                    total = _halves_sum(builder, builder.load(accs[r]), 16)
                    oi = builder.add(builder.mul(ir.Constant(i64, r), n_out), n)
                    builder.store(total, element_ptr(context, builder, t_out, a_out, oi, types.int64, f32), align=4)

        emit_cases(builder, context.cast(builder, args[6], sig.args[6], types.int64), range(1, MAX_ROWS + 1), body)
        return context.get_dummy_value()

    return types.void(qs, d, n0, n1, xq, xs, rows, out), codegen


@njit(cache=True, parallel=True)
def q8_0_gemv(xq: np.ndarray, xs: np.ndarray, qs: np.ndarray, d: np.ndarray, out: np.ndarray,
              n_threads: int) -> None:
    """``out [M, N] = (xs * xq) @ (d * qs)^T`` (float32, each scale over its group of 32): ``xq`` int16
    ``[M, K]`` and ``xs`` float32 ``[M, K/32]`` from ``quantize_groups_int16_f32`` (``|xq| <= 32767``: a
    block's 32 products with ``|q| <= 127`` stay inside int32),
    ``qs`` int8 ``[N, K]`` and ``d`` float32 ``[N, K/32]`` (``Q8_0Weight``). Each thread takes a range of
    weight rows, chunk by chunk, and runs every 8 rows of ``xq`` over a chunk while it is in L2."""
    m, n = out.shape
    workers = max(1, min(n_threads, n))
    for w in prange(workers):
        lo, hi = w * n // workers, (w + 1) * n // workers
        for n0 in range(lo, hi, N_CHUNK):
            n1 = min(n0 + N_CHUNK, hi)
            for r0 in range(0, m, MAX_ROWS):
                _q8_rows(qs, d, n0, n1, xq[r0:r0 + MAX_ROWS], xs[r0:r0 + MAX_ROWS], min(MAX_ROWS, m - r0),
                         out[r0:r0 + MAX_ROWS])
