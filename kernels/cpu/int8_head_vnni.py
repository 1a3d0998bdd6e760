"""The greedy head's int8 copy times int8 activations on AVX512-VNNI ``vpdpbusd``, for many rows.

A batched greedy step (32 rows of a 49152 x 576 head: 1.8 GFLOP) is arithmetic-bound. ``vdpbf16ps``
and ``vpdpwssd`` do 32 multiply-adds an instruction; ``vpdpbusd`` does 64, bytes times bytes. So here
each activation row is quantized to int8 in groups of 32 (``x ~= s[g] * xq``, ``|xq| <= 127``) and
the weights are the head's per-row int8 copy plus 128, stored as unsigned bytes:

    sum_k w[k] x[k] = sum_g s[g] * (sum_{k in g} (w[k] + 128) xq[k] - 128 sum_{k in g} xq[k])

Each group's integer sum starts from ``-128 sum xq`` (``quantize_groups`` keeps it per row and
group), so it is exact in int32; the groups are folded in float32 and scaled by the weight row's scale.
These logits are only a screen: per-row scales would let one outlier coarsen a whole row (thousands
of candidates to re-score on SmolLM2's hidden states), groups of 32 leave ~50 a row, and
``q8_0_rescore`` recomputes each candidate exactly from the activations used (``x_used``), so the
argmax is the exact head's. Activations this coarse are not used for anything else: through every
linear they turn SmolLM2's answer to "What is the capital of France?" into nonsense (BENCHMARKS.md).

Register blocks are 4 activation rows by 48 columns (12 int32 and 12 float32 accumulators); a panel of
48 weight columns (27 KB at K = 576) stays in L1 while every row block runs over it.

Example::

    panels = vnni_panels(qw)                          # once: uint8 [ceil(N/48), K/4, 48, 4]
    xq, s, off, x_used = quantize_groups(x)           # x float32 [M, K]
    int8_head_vnni(xq, s, off, panels, scale, out, 2)  # out float32 [M, N]
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.head_screen import COLS, store_screened, store_screened_ragged
from edgellm.kernels.cpu.int4_gemv import quantize_groups_into

GROUP = 32  # activations per scale
ROWS = 4  # activation rows per register block
QUADS = GROUP // 4  # four bytes per lane and ``vpdpbusd``


def supports(k: int) -> bool:
    """Whether a head with rows of ``k`` fits (the caller checks the CPU: ``int8_gemv.supported``)."""
    return k % GROUP == 0


@njit(cache=True, parallel=True)
def vnni_panels(qw: np.ndarray) -> np.ndarray:
    """``qw`` int8 ``[N, K]`` plus 128 as unsigned bytes, ``[ceil(N/48), K/4, 48, 4]``: ``panels[p, i, c,
    e] = qw[48 p + c, 4 i + e] + 128``; columns past N are 128 (weight 0)."""
    n, k = qw.shape
    n_panels = (n + COLS - 1) // COLS
    panels = np.full((n_panels, k // 4, COLS, 4), 128, np.uint8)
    for p in prange(n_panels):
        for c in range(min(COLS, n - p * COLS)):
            row = qw[p * COLS + c]
            for i in range(k):
                panels[p, i // 4, c, i % 4] = np.uint8(np.int32(row[i]) + 128)
    return panels


@njit(cache=True)
def quantize_groups(x: np.ndarray):
    """``(xq int8 [M, K], s float32 [M, K/32], off int32 [M, K/32], x_used float32 [M, K])``: each group of
    32 activations as ``s * xq`` (``|xq| <= 127``), ``off = -128 sum xq`` (the weights' offset, taken
    out of each group's integer sum) and ``x_used = s * xq``, the activations the kernel multiplies."""
    m, k = x.shape
    xq = np.empty((m, k), np.int8)
    s = np.empty((m, k // GROUP), np.float32)
    totals = np.empty((m, k // GROUP), np.int32)
    quantize_groups_into(x, 127, xq, s, totals)
    x_used = (xq.astype(np.float32).reshape(m, k // GROUP, GROUP) * s.reshape(m, k // GROUP, 1)).reshape(m, k)
    off = (-128 * totals).astype(np.int32)
    return xq, s, off, x_used


@intrinsic
def _head_block(typingctx, panels, p0, xq, x0, k4, s, off, so, groups, rows, out):
    """``out[16 (3 r + v) + i] = sum_g s[so + G r + g] * (off[so + G r + g] + sum_{q < 8} bytes(panels[p0
    + 48 (8 g + q) + 16 v + i]) . bytes(xq[x0 + k4 r + 8 g + q]))`` for ``r < rows`` (1-4), ``v < 3``,
    ``G = groups``: the flat uint32 views of a panel and of the int8 activations (four bytes each, the
    weights unsigned, the activations signed)."""
    if not (isinstance(rows, types.Integer) and isinstance(groups, types.Integer)):
        return None
    u32 = (panels, xq)
    if not (all(isinstance(t, types.Array) and t.dtype == types.uint32 and t.layout == "C" for t in u32)
            and isinstance(s, types.Array) and s.dtype == types.float32
            and isinstance(off, types.Array) and off.dtype == types.int32
            and isinstance(out, types.Array) and out.dtype == types.float32 and out.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        t_p, t_p0, t_x, t_x0, t_k4, t_s, t_off, t_so, t_g, _, t_out = sig.args
        v_p, v_p0, v_x, v_x0, v_k4, v_s, v_off, v_so, v_g, v_rows, v_out = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16i, v16f = ir.VectorType(i32, 16), ir.VectorType(ir.FloatType(), 16)
        as64 = lambda v, t: context.cast(builder, v, t, types.int64)  # noqa: E731
        p0, x0, k4, so = as64(v_p0, t_p0), as64(v_x0, t_x0), as64(v_k4, t_k4), as64(v_so, t_so)
        n_groups = as64(v_g, t_g)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]),
                                             "llvm.fma.v16f32")
        splat_mask = ir.Constant(v16i, [0] * 16)
        c = lambda v: ir.Constant(i64, v)  # noqa: E731

        def splat(value, vec_type):
            one = builder.insert_element(ir.Constant(vec_type, None), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, one, splat_mask)

        def body(n_rows):
            facc = [[cgutils.alloca_once_value(builder, ir.Constant(v16f, None)) for _ in range(3)]
                    for _ in range(n_rows)]
            iacc = [[cgutils.alloca_once(builder, v16i) for _ in range(3)] for _ in range(n_rows)]
            with cgutils.for_range(builder, n_groups) as g_loop:
                g = g_loop.index
                for r in range(n_rows):
                    at = builder.add(so, builder.add(builder.mul(c(r), n_groups), g))
                    start = splat(builder.load(element_ptr(context, builder, t_off, v_off, at, types.int64, i32)), v16i)
                    for v in range(3):
                        builder.store(start, iacc[r][v])
                with cgutils.for_range(builder, c(QUADS)) as q_loop:
                    quad = builder.add(builder.mul(g, c(QUADS)), q_loop.index)
                    row_w = builder.add(p0, builder.mul(quad, c(COLS)))
                    wv = [builder.load(element_ptr(context, builder, t_p, v_p, row_w, types.int64, v16i,
                                                   offset=16 * v), align=4) for v in range(3)]
                    for r in range(n_rows):
                        at = builder.add(x0, builder.add(builder.mul(c(r), k4), quad))
                        xb = splat(builder.load(element_ptr(context, builder, t_x, v_x, at, types.int64, i32),
                                                align=4), v16i)
                        for v in range(3):
                            builder.store(builder.call(dp, [builder.load(iacc[r][v]), wv[v], xb]), iacc[r][v])
                for r in range(n_rows):
                    at = builder.add(so, builder.add(builder.mul(c(r), n_groups), g))
                    sv = splat(builder.load(element_ptr(context, builder, t_s, v_s, at, types.int64,
                                                        ir.FloatType())), v16f)
                    for v in range(3):
                        summed = builder.sitofp(builder.load(iacc[r][v]), v16f)
                        builder.store(builder.call(fma, [summed, sv, builder.load(facc[r][v])]), facc[r][v])
            for r in range(n_rows):
                for v in range(3):
                    ptr = element_ptr(context, builder, t_out, v_out, c(16 * (3 * r + v)), types.int64, v16f)
                    builder.store(builder.load(facc[r][v]), ptr, align=4)

        emit_cases(builder, as64(v_rows, sig.args[9]), range(1, ROWS + 1), body)
        return context.get_dummy_value()

    return types.void(panels, p0, xq, x0, k4, s, off, so, groups, rows, out), codegen


@njit(cache=True)
def _panels(xq32, s_flat, off_flat, panels32, scale, out, p0, p1, err_norm, w_norm, x_n, act_n, lows, highs):
    """Output columns ``48 p0 : 48 p1`` (those below N) of ``out``: every 4 rows over each panel,
    stored (and, with ``lows`` not None, screened: ``head_screen``) straight from the accumulators."""
    m, k4 = xq32.shape
    n = out.shape[1]
    groups = 4 * k4 // GROUP
    panel_words = k4 * COLS
    xq_flat = xq32.reshape(-1)
    cbuf = np.empty(ROWS * COLS, np.float32)
    n_valid = n if lows is None else err_norm.shape[0]
    for p in range(p0, p1):
        n0 = p * COLS
        cols = min(COLS, n - n0)
        for r0 in range(0, m, ROWS):
            rows = min(ROWS, m - r0)
            _head_block(panels32, p * panel_words, xq_flat, r0 * k4, k4, s_flat, off_flat, r0 * groups, groups,
                        rows, cbuf)
            if n0 + COLS <= n_valid:
                store_screened(cbuf, rows, scale, n0, out, r0, err_norm, w_norm, x_n, act_n, lows, highs, p)
            else:
                store_screened_ragged(cbuf, rows, cols, scale, n0, out, r0, err_norm, w_norm, x_n, act_n, lows,
                                      highs, p)


@njit(cache=True, parallel=True)
def int8_head_vnni(xq: np.ndarray, s: np.ndarray, off: np.ndarray, panels: np.ndarray, scale: np.ndarray,
                   out: np.ndarray, n_threads: int, screen=None) -> None:
    """``out [M, N] = (x_used @ qw^T) * scale`` (float32) from ``quantize_groups``' ``xq, s, off`` and
    ``vnni_panels(qw)``: exact integer sums per group, folded in float32 in group order.

    ``screen = (err_norm [V], w_norm [V], x_n [M], act_n [M], lows [M, P], highs [M, P])``, ``P =
    ceil(N/48)``, also bounds the first ``V`` columns' errors per panel as they are stored, for
    ``q8_0_rescore_screened`` (``head_screen``)."""
    xq32 = xq.view(np.uint32)
    panels32 = panels.reshape(-1).view(np.uint32)
    n_panels = panels.shape[0]
    workers = max(1, min(n_threads, n_panels))
    for w in prange(workers):
        p0, p1 = w * n_panels // workers, (w + 1) * n_panels // workers
        if screen is None:
            _panels(xq32, s.reshape(-1), off.reshape(-1), panels32, scale, out, p0, p1, None, None, None, None,
                    None, None)
        else:
            err_norm, w_norm, x_n, act_n, lows, highs = screen
            _panels(xq32, s.reshape(-1), off.reshape(-1), panels32, scale, out, p0, p1, err_norm, w_norm, x_n,
                    act_n, lows, highs)
