"""Q8_0 weights times a few rows with exact integer block sums (AVX512-VNNI ``vpdpwssd``, or AVX2
``vpmaddwd``): the full logits a sampled decode step needs.

A greedy step takes only each row's argmax, which the head's int8 copy screens and ``q8_0_rescore``
makes exact. A sampled step (temperature > 0, logprobs, penalties) needs every logit, and the float32
path dequantized each row of the weight and multiplied in float32: 3.3 ms for one row of SmolLM2's
49152 x 576 head (a third of a sampled token), 22 ms for 32 rows.

Here each group of 32 activations is quantized to int16 with its own scale (``x = xs_g * xq``, 15
bits under the group's largest value: an outlier coarsens only its own group). The weight is re-laid
once in panels of 16 output columns (``q8_0_panels``: int8 pairs of consecutive k, 28 MB for that
head, and the block scales transposed to match); a block's 32 products per column are summed exactly
in int32 by 16 ``vpdpwssd`` (the int8 pairs widened to int16 as they load, each activation pair
broadcast), then ``acc = fma(float(sum) * xs_g, d_b, acc)`` block after block. Every output's numbers
depend on its own row and column alone, in the same order whatever the batch: batch-invariant.

Example::

    qp, dt = q8_0_panels(w.qs, w.d)                 # once per weight
    xq, xs, _ = quantize_groups_int16_f32(x)        # x float32 [M, K]
    q8_0_gemv(xq, xs, qp, dt, out, 2)               # out float32 [M, N]
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.isa import dot_i16_pairs, int16_dots
from edgellm.kernels.cpu.prefetch import emit_prefetch

QK = 32  # weights per Q8_0 block: 16 pairs, one vpdpwssd each per activation row
LANES = 16  # output columns per panel: one vector of int32 sums
MAX_ROWS = 8  # activation rows per pass over a panel: 8 int32 + 8 float32 accumulators
# panel bytes ahead to prefetch, once a cache line (every other pair; a panel is 9 KiB at K = 576):
# cold, 0.72 against 0.79-0.96 ms for one row of a 49152 x 576 head and 3.1 against 4.2-4.7 at 32 (Zen 5)
PREFETCH_BYTES = 8192


def supported() -> bool:
    """Whether this kernel compiles on this target: with AVX512-VNNI ``vpdpwssd`` (Intel Cascade Lake and
    later, AMD Zen 4) or AVX2 ``vpmaddwd`` (the same exact block sums, for CPUs without AVX-512)."""
    return int16_dots() is not None


def supports(k: int) -> bool:
    """Whether rows of ``k`` weights take this kernel (whole Q8_0 blocks) on this CPU."""
    return k % QK == 0 and k > 0 and supported()


@njit(cache=True, parallel=True)
def q8_0_panels(qs: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(qp int8 [P, K/2, 16, 2], dt float32 [P, K/32, 16])``, ``P = ceil(N / 16)``: ``qp[p, i, c]`` holds
    ``qs[16 p + c, 2i : 2i + 2]`` and ``dt[p, b, c]`` is ``d[16 p + c, b]``; columns past N weigh nothing."""
    n, k = qs.shape
    panels = -(-n // LANES)
    qp = np.zeros((panels, k // 2, LANES, 2), np.int8)
    dt = np.zeros((panels, k // QK, LANES), np.float32)
    for p in prange(panels):
        for c in range(min(LANES, n - p * LANES)):
            row = p * LANES + c
            for i in range(k // 2):
                qp[p, i, c, 0] = qs[row, 2 * i]
                qp[p, i, c, 1] = qs[row, 2 * i + 1]
            for b in range(k // QK):
                dt[p, b, c] = d[row, b]
    return qp, dt


@intrinsic
def _panel_rows(typingctx, qp, p, dt, xq, xs, rows, out):
    """``out[r, c] = sum_b fma-accumulated float(sum_{k in b} qs[16 p + c, k] xq[r, k]) * xs[r, b] * d[16 p +
    c, b]`` (float32 ``out [>= rows, 16]``) for ``r < rows`` (1-8: one body unrolled for each count)."""
    if not isinstance(rows, types.Integer):
        return None
    if not (isinstance(qp, types.Array) and qp.dtype == types.int8 and qp.layout == "C" and qp.ndim == 4
            and isinstance(dt, types.Array) and dt.dtype == types.float32 and dt.layout == "C"
            and isinstance(xq, types.Array) and xq.dtype == types.int16 and xq.layout == "C"
            and isinstance(xs, types.Array) and xs.dtype == types.float32 and xs.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.float32 and out.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        t_qp, t_p, t_dt, t_xq, t_xs, _, t_out = sig.args
        a_qp, a_p, a_dt, a_xq, a_xs, _, a_out = args
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16i, v16f = ir.VectorType(i32, 16), ir.VectorType(f32, 16)
        half_k = builder.extract_value(context.make_array(t_qp)(context, builder, a_qp).shape, 1)
        k = builder.mul(half_k, ir.Constant(i64, 2))
        blocks = builder.sdiv(k, ir.Constant(i64, QK))
        p = context.cast(builder, a_p, t_p, types.int64)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        zeros = ir.Constant(v16i, [0] * 16)

        def splat(scalar, vec):
            one = builder.insert_element(ir.Constant(vec, None), scalar, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vec, None), zeros)

        def body(n_rows):
            faccs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, None)) for _ in range(n_rows)]
            iaccs = [cgutils.alloca_once(builder, v16i) for _ in range(n_rows)]
            panel0 = builder.mul(p, half_k)  # the panel's first pair
            with cgutils.for_range(builder, blocks) as b_loop:
                b = b_loop.index
                for acc in iaccs:
                    builder.store(ir.Constant(v16i, None), acc)
                with cgutils.for_range(builder, ir.Constant(i64, QK // 2)) as j_loop:
                    pair = builder.add(builder.mul(b, ir.Constant(i64, QK // 2)), j_loop.index)
                    wq = builder.load(element_ptr(context, builder, t_qp, a_qp,
                                                  builder.mul(builder.add(panel0, pair), ir.Constant(i64, 2 * LANES)),
                                                  types.int64, ir.VectorType(ir.IntType(8), 2 * LANES)), align=1)
                    w = builder.bitcast(builder.sext(wq, ir.VectorType(ir.IntType(16), 2 * LANES)), v16i)
                    even = builder.icmp_unsigned("==", builder.and_(j_loop.index, ir.Constant(i64, 1)),
                                                 ir.Constant(i64, 0))
                    with builder.if_then(even):  # one a cache line (two pairs)
                        ahead = builder.add(builder.mul(builder.add(panel0, pair), ir.Constant(i64, 2 * LANES)),
                                            ir.Constant(i64, PREFETCH_BYTES))
                        emit_prefetch(builder, element_ptr(context, builder, t_qp, a_qp, ahead, types.int64), 3)
                    for r in range(n_rows):
                        xi = builder.add(builder.mul(ir.Constant(i64, r), k), builder.mul(pair, ir.Constant(i64, 2)))
                        xv = builder.load(element_ptr(context, builder, t_xq, a_xq, xi, types.int64, i32), align=2)
                        builder.store(dot_i16_pairs(builder, builder.load(iaccs[r]), w, splat(xv, v16i)), iaccs[r])
                ahead_d = builder.mul(builder.add(builder.mul(builder.add(p, ir.Constant(i64, 2)), blocks), b),
                                      ir.Constant(i64, LANES))  # the same block two panels on
                emit_prefetch(builder, element_ptr(context, builder, t_dt, a_dt, ahead_d, types.int64, f32), 3)
                dv = builder.load(element_ptr(context, builder, t_dt, a_dt,
                                              builder.mul(builder.add(builder.mul(p, blocks), b), ir.Constant(i64, LANES)),
                                              types.int64, v16f), align=4)
                for r in range(n_rows):
                    gs = builder.load(element_ptr(context, builder, t_xs, a_xs,
                                                  builder.add(builder.mul(ir.Constant(i64, r), blocks), b),
                                                  types.int64, f32), align=4)
                    sums = builder.fmul(builder.sitofp(builder.load(iaccs[r]), v16f), splat(gs, v16f))
                    builder.store(builder.call(fma, [sums, dv, builder.load(faccs[r])]), faccs[r])
            for r in range(n_rows):
                builder.store(builder.load(faccs[r]), element_ptr(context, builder, t_out, a_out,
                                                                  ir.Constant(i64, LANES * r), types.int64, v16f),
                              align=4)

        emit_cases(builder, context.cast(builder, args[5], sig.args[5], types.int64), range(1, MAX_ROWS + 1), body)
        return context.get_dummy_value()

    return types.void(qp, p, dt, xq, xs, rows, out), codegen


@njit(cache=True, parallel=True)
def q8_0_gemv(xq: np.ndarray, xs: np.ndarray, qp: np.ndarray, dt: np.ndarray, out: np.ndarray,
              n_threads: int) -> None:
    """``out [M, N] = (xs * xq) @ (d * qs)^T`` (float32, each scale over its group of 32): ``xq`` int16
    ``[M, K]`` and ``xs`` float32 ``[M, K/32]`` from ``quantize_groups_int16_f32`` (``|xq| <= 32767``: a
    block's 32 products with ``|q| <= 127`` stay inside int32), the weight as ``q8_0_panels``. Each
    thread takes a run of 16-column panels and every 8 rows over each panel while it is in L1."""
    m, n = out.shape
    panels = qp.shape[0]
    workers = max(1, min(n_threads, panels))
    for w in prange(workers):
        cbuf = np.empty((MAX_ROWS, LANES), np.float32)
        for p in range(w * panels // workers, (w + 1) * panels // workers):
            cols = min(LANES, n - p * LANES)
            for r0 in range(0, m, MAX_ROWS):
                rows = min(MAX_ROWS, m - r0)
                _panel_rows(qp, p, dt, xq[r0:r0 + rows], xs[r0:r0 + rows], rows, cbuf)
                for r in range(rows):
                    for c in range(cols):
                        out[r0 + r, p * LANES + c] = cbuf[r, c]
