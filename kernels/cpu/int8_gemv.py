"""An output head's per-row int8 copy times a few rows, with int16 dot products (AVX512-VNNI, or AVX2).

A greedy decode step of one stream reads the whole head (28 MB for 49152 x 576) to find one argmax;
ATen's ``_weight_int8pack_mm`` does it at ~12 GB/s. Here each row ``x`` is quantized to int16 with
one scale (``x = s * xq``, 15 bits: finer than the bf16 that ATen's kernel rounds ``x`` to) and
``vpdpwssd`` sums ``xq * w`` pairs exactly in int32, so each weight costs one sign extension and half
a dot-product instruction and the read runs near memory speed. Logits are ``s * scale[n] * sum``;
the caller's exact re-scoring (``q8_0_rescore``) takes ``s * xq`` as the activations it used.

Example::

    xq, s = quantize_rows_int16(x, xq_limit(K))   # x float32 [M, K]
    int8_gemv(xq, s, qw, scale, out, 2)     # out float32 [M, N]
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.isa import dot_i16_pairs, has, int16_dots
from edgellm.kernels.cpu.prefetch import CACHE_LINE, emit_prefetch

MAX_ROWS = 8  # x rows per pass over a chunk of weight rows: 8 accumulators
N_CHUNK = 256  # weight rows per chunk: 147 KB at K = 576, read from L2 by every pass
CHUNK = 32  # weights per sign extension and dot product
# weight rows ahead to prefetch (9 KiB at K = 576): one core's hardware prefetchers alone stream the head
# at ~7 GB/s; with these, 1.97 -> 1.27 ms for 49152 x 576 on 2 threads (AMX Xeon VM)
PREFETCH_ROWS = 16
INT32_MAX = 2 ** 31 - 1


@functools.cache
def supported() -> bool:
    """Whether this CPU has AVX512-VNNI (``vpdpwssd``): Intel Cascade Lake and later, AMD Zen 4."""
    return has("avx512vnni", "avx512bw")


def runs() -> bool:
    """Whether ``int8_gemv`` compiles on this target: with AVX512-VNNI (``supported``) or AVX2
    (``vpmaddwd``: the same exact sums, for CPUs without AVX-512)."""
    return int16_dots() is not None


def xq_limit(k: int) -> int:
    """The largest ``|xq|`` whose ``k`` products with int8 weights (|w| <= 127) cannot overflow int32:
    32767 up to K = 516, 16513 at 1024, 8256 at 2048 (13 bits: still finer than bf16's 8)."""
    return min(32767, INT32_MAX // (127 * k))


@intrinsic
def _rows_dot(typingctx, qw, n0, n1, xq, rows, out):
    """``out[r, n] = sum_k xq[r, k] * qw[n, k]`` (int32, exact) for ``n0 <= n < n1``, ``r < rows``
    (1-8: one body unrolled for each count, ``emit_cases``); ``K % 32 == 0``."""
    if not isinstance(rows, types.Integer):
        return None
    if not (isinstance(qw, types.Array) and qw.dtype == types.int8 and qw.layout == "C" and qw.ndim == 2
            and isinstance(xq, types.Array) and xq.dtype == types.int16 and xq.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.int32 and out.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        t_qw, t_n0, t_n1, t_xq, _, t_out = sig.args
        a_qw, a_n0, a_n1, a_xq, _, a_out = args
        i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v16i = ir.VectorType(i32, 16)
        k = builder.extract_value(context.make_array(t_qw)(context, builder, a_qw).shape, 1)
        n_out = builder.extract_value(context.make_array(t_out)(context, builder, a_out).shape, 1)
        n0 = context.cast(builder, a_n0, t_n0, types.int64)
        n1 = context.cast(builder, a_n1, t_n1, types.int64)
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [v16i]),
                                                "llvm.vector.reduce.add.v16i32")

        def body(n_rows):
            accs = [cgutils.alloca_once(builder, v16i) for _ in range(n_rows)]
            chunks = builder.sdiv(k, ir.Constant(i64, CHUNK))
            with cgutils.for_range(builder, builder.sub(n1, n0)) as n_loop:
                n = builder.add(n0, n_loop.index)
                for acc in accs:
                    builder.store(ir.Constant(v16i, None), acc)
                row = builder.mul(n, k)
                ahead = builder.add(row, builder.mul(k, ir.Constant(i64, PREFETCH_ROWS)))
                with cgutils.for_range(builder, builder.sdiv(builder.add(k, ir.Constant(i64, CACHE_LINE - 1)),
                                                             ir.Constant(i64, CACHE_LINE))) as l_loop:
                    line = builder.add(ahead, builder.mul(l_loop.index, ir.Constant(i64, CACHE_LINE)))
                    emit_prefetch(builder, element_ptr(context, builder, t_qw, a_qw, line, types.int64), 3)
                with cgutils.for_range(builder, chunks) as c_loop:
                    off = builder.mul(c_loop.index, ir.Constant(i64, CHUNK))
                    w8 = builder.load(element_ptr(context, builder, t_qw, a_qw, builder.add(row, off), types.int64,
                                                  ir.VectorType(ir.IntType(8), CHUNK)), align=1)
                    w = builder.bitcast(builder.sext(w8, ir.VectorType(i16, CHUNK)), v16i)
                    for r in range(n_rows):
                        xi = builder.add(builder.mul(ir.Constant(i64, r), k), off)
                        xv = builder.load(element_ptr(context, builder, t_xq, a_xq, xi, types.int64,
                                                      ir.VectorType(i16, CHUNK)), align=2)
                        summed = dot_i16_pairs(builder, builder.load(accs[r]), w, builder.bitcast(xv, v16i))
                        builder.store(summed, accs[r])
                for r in range(n_rows):
                    total = builder.call(reduce, [builder.load(accs[r])])
                    oi = builder.add(builder.mul(ir.Constant(i64, r), n_out), n)
                    builder.store(total, element_ptr(context, builder, t_out, a_out, oi, types.int64, i32), align=4)

        emit_cases(builder, context.cast(builder, args[4], sig.args[4], types.int64), range(1, MAX_ROWS + 1), body)
        return context.get_dummy_value()

    return types.void(qw, n0, n1, xq, rows, out), codegen


@njit(cache=True)
def quantize_rows_int16(x, limit):
    """``(xq int16 [M, K], s float32 [M])`` with ``x ~= s[:, None] * xq`` and ``|xq| <= limit``."""
    m, k = x.shape
    xq = np.empty((m, k), np.int16)
    s = np.empty(m, np.float32)
    for r in range(m):
        amax = np.float32(0.0)
        for i in range(k):
            amax = max(amax, abs(x[r, i]))
        scale = np.float32(amax / limit) if amax > 0 else np.float32(1.0)
        inv = np.float32(1.0) / scale
        for i in range(k):
            xq[r, i] = np.int16(np.rint(x[r, i] * inv))
        s[r] = scale
    return xq, s


@njit(cache=True, parallel=True)
def int8_gemv(xq: np.ndarray, s: np.ndarray, qw: np.ndarray, scale: np.ndarray, out: np.ndarray,
              n_threads: int) -> None:
    """``out [M, N] = s[:, None] * (xq @ qw^T) * scale`` (float32), ``K % 32 == 0``: the integer sums
    are exact, then two float32 scalings. Each thread takes a range of weight rows, chunk by chunk,
    and runs every 8 rows of ``xq`` over a chunk while it is in L2."""
    m, n = out.shape
    acc = np.empty((m, n), np.int32)
    workers = max(1, n_threads)
    for w in prange(workers):
        lo, hi = w * n // workers, (w + 1) * n // workers
        for n0 in range(lo, hi, N_CHUNK):
            n1 = min(n0 + N_CHUNK, hi)
            for r0 in range(0, m, MAX_ROWS):
                _rows_dot(qw, n0, n1, xq[r0:r0 + MAX_ROWS], min(MAX_ROWS, m - r0), acc[r0:r0 + MAX_ROWS])
        for r in range(m):
            for j in range(lo, hi):
                out[r, j] = np.float32(acc[r, j]) * s[r] * scale[j]
