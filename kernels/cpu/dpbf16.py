"""Quantized weights times bf16 rows with AVX512-BF16 dot products, for CPUs without AMX (AMD Zen 4
and later, Intel Cooper Lake).

``vdpbf16ps acc, a, b`` adds ``a[2i] b[2i] + a[2i+1] b[2i+1]`` to each of 16 float32 lanes: the same
arithmetic as AMX's ``tdpbf16ps`` (bf16 pairs, float32 sums), one 512-bit register at a time. Both
matmuls here widen each weight once per call into "VNNI" pairs (two consecutive k of one column in
a uint32) and multiply in register blocks of up to 8 broadcast rows times 32 columns
(``_dot_block``): 16 accumulators, so the products' latency hides behind each other.

- ``int4_dpbf16_matmul``: ATen's packed int4 layout read in place, each group widened to bf16 in
  float32 arithmetic and rounded once, as ``int4_amx`` and ``bf16_expand`` do: the same weights.
- ``int8_dpbf16_matmul``: an output head's per-row int8 copy (exact in bf16) times bf16 rows, scaled
  per row, as ATen's ``_weight_int8pack_mm`` and ``int8_amx`` compute.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import _BFloat, element_ptr, emit_cases
from edgellm.kernels.cpu.int4_amx import panel_at, store_bf16_32, widen_panel
from edgellm.kernels.cpu.int8_amx import vnni_transpose, widen_int8_32
from edgellm.kernels.cpu.isa import has
from edgellm.kernels.cpu.prefetch import CACHE_LINE, emit_prefetch, prefetch_l2

BLOCK_ROWS = 8  # broadcast rows per register block: 8 x 2 accumulators + 2 weight vectors + 1 broadcast
PANEL = 32  # output columns per widened panel (int4) / weight rows per pass (int8)
GROUP = 32


@functools.cache
def supported() -> bool:
    """Whether this CPU has AVX512-BF16 (``vdpbf16ps``, ``vcvtne2ps2bf16``)."""
    return has("avx512bf16", "avx512f", "avx512bw")


def _dp(builder):
    v16f, v32b = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_BFloat(), 32)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v32b, v32b]),
                                          "llvm.x86.avx512bf16.dpbf16ps.512")


def _dot_codegen(context, builder, sig, args):
    """The body of ``_dot_block`` and ``_dot_block_pf`` (which passes three more arguments)."""
    t_a, t_a0, t_as, _, t_b, t_b0, t_bs, _, t_p, t_c = sig.args[:10]
    v_a, v_a0, v_as, _, v_b, v_b0, v_bs, _, v_p, v_c = args[:10]
    i32, i64 = ir.IntType(32), ir.IntType(64)
    v16i, v16f, v32b = ir.VectorType(i32, 16), ir.VectorType(ir.FloatType(), 16), ir.VectorType(_BFloat(), 32)
    as64 = lambda v, t: context.cast(builder, v, t, types.int64)  # noqa: E731
    a0, a_s, b0, b_s = as64(v_a0, t_a0), as64(v_as, t_as), as64(v_b0, t_b0), as64(v_bs, t_bs)
    dp = _dp(builder)
    zero = ir.Constant(v16f, None)
    prefetch = None
    if len(args) > 10:  # one cache line of ``pf`` a pair, from byte pf0, for the first ``pf_lines`` pairs
        t_pf, t_pf0, t_pfn = sig.args[10:13]
        v_pf, v_pf0, v_pfn = args[10:13]
        i8p = ir.IntType(8).as_pointer()
        pf_base = builder.bitcast(context.make_array(t_pf)(context, builder, v_pf).data, i8p)
        pf0, pf_lines = as64(v_pf0, t_pf0), as64(v_pfn, t_pfn)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")

        def prefetch(p):
            with builder.if_then(builder.icmp_signed("<", p, pf_lines)):
                at = builder.gep(pf_base, [builder.add(pf0, builder.mul(p, ir.Constant(i64, CACHE_LINE)))])
                builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])

    runs = _run_stream(context, builder, sig.args[13:], args[13:]) if len(args) > 13 else None

    def body(n_rows, n_vecs):
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_vecs)] for _ in range(n_rows)]
        splat = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
        with cgutils.for_range(builder, as64(v_p, t_p)) as loop:
            p = loop.index
            row_b = builder.add(b0, builder.mul(p, b_s))
            wv = [builder.bitcast(builder.load(element_ptr(context, builder, t_b, v_b, row_b, types.int64, v16i,
                                                         offset=16 * v), align=4), v32b) for v in range(n_vecs)]
            for r in range(n_rows):
                idx = builder.add(builder.add(a0, builder.mul(ir.Constant(i64, r), a_s)), p)
                s = builder.load(element_ptr(context, builder, t_a, v_a, idx, types.int64, i32), align=4)
                one = builder.insert_element(ir.Constant(v16i, None), s, ir.Constant(i32, 0))
                bc = builder.bitcast(builder.shuffle_vector(one, one, splat), v32b)
                for v in range(n_vecs):
                    builder.store(builder.call(dp, [builder.load(accs[r][v]), bc, wv[v]]), accs[r][v])
            if prefetch is not None:
                prefetch(p)
            if runs is not None:
                runs.prefetch(p)
        if runs is not None:
            runs.store()
        for r in range(n_rows):
            for v in range(n_vecs):
                ptr = element_ptr(context, builder, t_c, v_c, ir.Constant(i64, 16 * (n_vecs * r + v)), types.int64,
                                  v16f)
                builder.store(builder.load(accs[r][v]), ptr, align=4)

    n_rows_v, n_vecs_v = as64(args[3], sig.args[3]), as64(args[7], sig.args[7])
    emit_cases(builder, n_vecs_v, (1, 2), lambda n_vecs: emit_cases(
        builder, n_rows_v, range(1, BLOCK_ROWS + 1), lambda n_rows: body(n_rows, n_vecs)))
    return context.get_dummy_value()


class _run_stream:
    """For ``_dot_block_runs``' codegen: one cache line a pair, for the first ``cur[2]`` pairs, walking
    the runs ``runs [R, 3]`` (byte offset into ``pf``, lines, -) from run ``cur[0]``, line ``cur[1]``;
    where the walk stopped goes back into ``cur[0:2]`` (``store``), so the next call goes on from there."""

    def __init__(self, context, builder, tys, vals):
        t_pf, t_runs, t_cur = tys
        v_pf, v_runs, v_cur = vals
        i64 = ir.IntType(64)
        self.builder, self.i64 = builder, i64
        self.base = builder.bitcast(context.make_array(t_pf)(context, builder, v_pf).data, ir.IntType(8).as_pointer())
        self.runs = builder.bitcast(context.make_array(t_runs)(context, builder, v_runs).data, i64.as_pointer())
        self.cur = builder.bitcast(context.make_array(t_cur)(context, builder, v_cur).data, i64.as_pointer())
        at = lambda i: builder.gep(self.cur, [ir.Constant(i64, i)])  # noqa: E731
        self.run = cgutils.alloca_once_value(builder, builder.load(at(0)))
        self.line = cgutils.alloca_once_value(builder, builder.load(at(1)))
        self.count = builder.load(at(2))

    def prefetch(self, p):
        b, i64 = self.builder, self.i64
        with b.if_then(b.icmp_signed("<", p, self.count)):
            run, line = b.load(self.run), b.load(self.line)
            row = b.gep(self.runs, [b.mul(run, ir.Constant(i64, 3))])
            byte = b.add(b.load(row), b.mul(line, ir.Constant(i64, CACHE_LINE)))
            emit_prefetch(b, b.gep(self.base, [byte]), 2)
            nxt = b.add(line, ir.Constant(i64, 1))
            done = b.icmp_signed("==", nxt, b.load(b.gep(row, [ir.Constant(i64, 1)])))
            b.store(b.select(done, b.add(run, ir.Constant(i64, 1)), run), self.run)
            b.store(b.select(done, ir.Constant(i64, 0), nxt), self.line)

    def store(self):
        b = self.builder
        b.store(b.load(self.run), b.gep(self.cur, [ir.Constant(self.i64, 0)]))
        b.store(b.load(self.line), b.gep(self.cur, [ir.Constant(self.i64, 1)]))


def _dot_types_ok(a, rows, b, vecs, c) -> bool:
    return (isinstance(rows, types.Integer) and isinstance(vecs, types.Integer)
            and all(isinstance(t, types.Array) and t.layout == "C" and t.dtype == types.uint32 for t in (a, b))
            and isinstance(c, types.Array) and c.layout == "C" and c.dtype == types.float32)


@intrinsic
def _dot_block(typingctx, a, a0, a_stride, rows, b, b0, b_stride, vecs, pairs, c):
    """``c.flat[16 vecs r + 16 v + i] = sum_p bf16x2(a.flat[a0 + r a_stride + p]) . bf16x2(b.flat[b0 +
    p b_stride + 16 v + i])`` for ``r < rows``, ``v < vecs``, ``i < 16``, ``p < pairs``.

    ``a`` and ``b`` hold bf16 pairs as uint32; each ``a`` pair is broadcast to all lanes. ``rows``
    (1-8) and ``vecs`` (1-2) select one of the bodies unrolled for each count (``emit_cases``), so
    the accumulators live in registers.
    """
    if not _dot_types_ok(a, rows, b, vecs, c):
        return None
    return types.void(a, a0, a_stride, rows, b, b0, b_stride, vecs, pairs, c), _dot_codegen


@intrinsic
def _dot_block_pf(typingctx, a, a0, a_stride, rows, b, b0, b_stride, vecs, pairs, c, pf, pf0, pf_lines):
    """``_dot_block`` that also asks for the cache lines at bytes ``pf0 + 64 i`` of array ``pf`` into
    L2, one each pair ``i < pf_lines``: data a later call streams from DRAM arrives while this one
    multiplies, at one prefetch every 16 or so ``vdpbf16ps`` (a burst of them stalls the loads)."""
    if not (_dot_types_ok(a, rows, b, vecs, c) and isinstance(pf, types.Array) and pf.layout == "C"
            and isinstance(pf0, types.Integer) and isinstance(pf_lines, types.Integer)):
        return None
    return types.void(a, a0, a_stride, rows, b, b0, b_stride, vecs, pairs, c, pf, pf0, pf_lines), _dot_codegen


@intrinsic
def _dot_block_runs(typingctx, a, a0, a_stride, rows, b, b0, b_stride, vecs, pairs, c, pf, pf0, pf_lines, kv, runs,
                    cur):
    """``_dot_block_pf`` that also asks for ``cur[2]`` cache lines of ``kv`` into L2, one a pair, along
    the runs ``runs [R, 3]`` (``_run_stream``): the next layer's cache blocks, which its attention
    would otherwise read from DRAM, streamed in while these products keep the cores busy."""
    if not (_dot_types_ok(a, rows, b, vecs, c) and isinstance(pf, types.Array) and pf.layout == "C"
            and isinstance(pf0, types.Integer) and isinstance(pf_lines, types.Integer)
            and isinstance(kv, types.Array) and kv.layout == "C"
            and all(isinstance(t, types.Array) and t.layout == "C" and t.dtype == types.int64 for t in (runs, cur))):
        return None
    return types.void(a, a0, a_stride, rows, b, b0, b_stride, vecs, pairs, c, pf, pf0, pf_lines, kv, runs,
                      cur), _dot_codegen


@njit(inline="always")
def _lookahead_share(lines, m, r0):
    """``(first, count)``: the share of a look-ahead of ``lines`` cache lines that the row block at
    ``r0`` (of ``m`` rows) asks for, so the prefetches spread evenly over a panel's row blocks."""
    per = -(-lines // -(-m // BLOCK_ROWS))
    first = r0 // BLOCK_ROWS * per
    return first, max(0, min(per, lines - first))


@njit(cache=True)
def kv_runs(kv, lens, tables, n_seqs, window):
    """The cache blocks decode attention reads for sequences ``0:n_seqs`` (each ``lens[s]`` keys over
    ``tables[s]``, the last ``window`` of them where ``window > 0``), as runs of cache lines of one
    layer's ``kv [2, blocks, ...]``: ``[R, 3]`` int64 of (byte offset, lines, lines before it), K's
    blocks then V's, consecutive blocks merged. Every layer's cache has the same layout and block
    tables, so one plan serves a step's layers."""
    block_bytes = kv.strides[1]
    plane_bytes = kv.strides[0]
    bs = kv.shape[3]
    first = np.zeros(n_seqs, np.int64)  # each sequence's first block attention reads
    n_blocks = 0
    for s in range(n_seqs):
        if window > 0:
            first[s] = max(0, lens[s] - window) // bs
        n_blocks += (lens[s] + bs - 1) // bs - first[s]
    runs = np.empty((2 * n_blocks, 3), np.int64)
    r = 0
    total = 0
    for plane in range(2):
        for s in range(n_seqs):
            prev = -2  # a sequence's first block starts a run
            for j in range(first[s], (lens[s] + bs - 1) // bs):
                b = tables[s, j]
                if b == prev + 1:
                    runs[r - 1, 1] += block_bytes // CACHE_LINE
                else:
                    runs[r, 0] = plane * plane_bytes + b * block_bytes
                    runs[r, 1] = block_bytes // CACHE_LINE
                    runs[r, 2] = total
                    r += 1
                total += block_bytes // CACHE_LINE
                prev = b
    return runs[:r]


@njit(cache=True)
def run_lines(runs):
    """How many cache lines ``runs`` (``kv_runs``) cover."""
    return runs[-1, 1] + runs[-1, 2] if runs.shape[0] else 0


@njit(cache=True, inline="always")
def _run_cursor(runs, g0, g1):
    """``_dot_block_runs``' cursor ``[run, line, lines this call]`` at line ``g0`` of the runs (where
    ``g1 > g0``: any lines to stream at all)."""
    cur = np.zeros(3, np.int64)
    if g1 > g0:
        cur[0] = np.searchsorted(runs[:, 2], g0, "right") - 1
        cur[1] = g0 - runs[cur[0], 2]
    return cur


@njit(cache=True)
def _int4_panels(x32, packed, sz, out, p0, p1, nxt_packed, nxt_sz, q0, q1, kv, runs, g0, g1, wide, nxt_wide):
    """Output columns ``32 p0 : 32 p1`` of ``out [M, N]`` (bf16 bits): each panel widened once into
    ``tiles [K/32, 16, 32]`` (``[K/2, 32]`` pairs), then every 8 rows of ``x32`` against it.

    A block's two panels share its packed bytes; while the second one's rows are multiplied, the next
    block streams into L2 (``_dot_block_pf``, a share with each row block): a layer's four linears of
    this model at 32 cold rows 0.68 against 0.75 ms, no change from 128 rows up, where the arithmetic
    hides DRAM anyway. While the first one's are, panels ``q0:q1`` of the weight the next call takes
    (``nxt_packed``, ``nxt_sz``: this worker's share of it) stream in, so that call starts warm too.
    And lines ``g0:g1`` of the cache runs ``runs`` of ``kv`` (``kv_runs``: the blocks the next layer's
    decode attention reads) stream into L2 over the row blocks, a line a pair (``_dot_block_runs``).

    Where ``wide`` holds the weight widened beforehand (``int4_to_bf16_panels``; else it has no
    panels) the panels are read from it instead, the next one streaming in meanwhile (the last one's
    successor is panel ``q0`` of ``nxt_wide``, where that has panels): the same products.
    """
    if wide.shape[0]:
        _wide_panels(x32, wide, out, p0, p1, nxt_wide, q0, q1, kv, runs, g0, g1)
        return
    m, half_k = x32.shape
    cur = _run_cursor(runs, g0, g1)
    calls_left = (p1 - p0) * -(-m // BLOCK_ROWS)
    kv_left = g1 - g0
    n = out.shape[1]
    groups = 2 * half_k // GROUP
    tiles = np.empty((groups, 16, PANEL), np.uint32)
    cbuf = np.empty((BLOCK_ROWS, PANEL), np.float32)
    sz_flat = sz.reshape(-1)
    block_lines = packed.shape[1] * packed.shape[2] // CACHE_LINE
    # the next weight's share: its packed blocks over the panels that start a block, its scale-zeros
    # (two cache lines a group per panel of it) over every panel
    nxt_block_lines = nxt_packed.shape[1] * nxt_packed.shape[2] // CACHE_LINE
    nxt_first = q0 // 2 * nxt_block_lines
    nxt_lines = ((q1 + 1) // 2 - q0 // 2) * nxt_block_lines if q1 > q0 else 0
    starts = (p1 + 1) // 2 - (p0 + 1) // 2
    nxt_sz_flat = nxt_sz.reshape(-1)
    sz_lines = nxt_sz.shape[0] * 2 * (q1 - q0)
    for p in range(p0, p1):
        block, _, n0 = panel_at(p)
        ahead = p % 2 == 1 and p + 1 < p1  # the next block is this worker's too
        if ahead:
            for g in range(groups):
                for c in range(32, 96, 16):  # its scale-zeros: 16 uint32 a cache line
                    prefetch_l2(sz_flat, g * n + n0 + c)
        i = p - p0
        for line in range(i * sz_lines // (p1 - p0), (i + 1) * sz_lines // (p1 - p0)):
            g, c = divmod(line, 2 * (q1 - q0))
            prefetch_l2(nxt_sz_flat, g * nxt_sz.shape[1] + 32 * q0 + 16 * c)
        share = 0
        share0 = 0
        if p % 2 == 0 and nxt_lines:
            j = p // 2 - (p0 + 1) // 2
            share0 = nxt_first + j * nxt_lines // starts
            share = nxt_first + (j + 1) * nxt_lines // starts - share0
        widen_panel(packed, sz, p, tiles)
        for r0 in range(0, m, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, m - r0)
            cur[2] = min(half_k, -(-kv_left // calls_left))
            kv_left -= cur[2]
            calls_left -= 1
            if share:
                first, lines = _lookahead_share(share, m, r0)
                _dot_block_runs(x32, r0 * half_k, half_k, rows, tiles, 0, PANEL, 2, half_k, cbuf, nxt_packed,
                                (share0 + first) * CACHE_LINE, lines, kv, runs, cur)
            else:
                first, lines = _lookahead_share(block_lines if ahead else 0, m, r0)
                _dot_block_runs(x32, r0 * half_k, half_k, rows, tiles, 0, PANEL, 2, half_k, cbuf, packed,
                                ((block + 1) * block_lines + first) * CACHE_LINE, lines, kv, runs, cur)
            for i in range(rows):
                store_bf16_32(cbuf, PANEL * i, out, (r0 + i) * n + n0)


@njit(cache=True)
def _wide_panels(x32, wide, out, p0, p1, nxt_wide, q0, q1, kv, runs, g0, g1):
    """``_int4_panels`` on the panels widened beforehand, ``wide [N/32, K/2, 32]``: every 8 rows of
    ``x32`` against each, streaming in the next panel (this worker's first of ``nxt_wide`` after its
    last, where ``q1 > q0``) and lines ``g0:g1`` of the cache runs, both over the row blocks."""
    m, half_k = x32.shape
    n = out.shape[1]
    cur = _run_cursor(runs, g0, g1)
    calls_left = (p1 - p0) * -(-m // BLOCK_ROWS)
    kv_left = g1 - g0
    cbuf = np.empty((BLOCK_ROWS, PANEL), np.float32)
    panel_lines = half_k * PANEL * 4 // CACHE_LINE
    nxt_lines = nxt_wide.shape[1] * PANEL * 4 // CACHE_LINE if q1 > q0 and nxt_wide.shape[0] else 0
    for p in range(p0, p1):
        n0 = p * PANEL
        for r0 in range(0, m, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, m - r0)
            cur[2] = min(half_k, -(-kv_left // calls_left))
            kv_left -= cur[2]
            calls_left -= 1
            if p + 1 < p1:
                first, lines = _lookahead_share(panel_lines, m, r0)
                _dot_block_runs(x32, r0 * half_k, half_k, rows, wide, p * half_k * PANEL, PANEL, 2, half_k, cbuf,
                                wide, ((p + 1) * panel_lines + first) * CACHE_LINE, lines, kv, runs, cur)
            else:
                first, lines = _lookahead_share(nxt_lines, m, r0)
                _dot_block_runs(x32, r0 * half_k, half_k, rows, wide, p * half_k * PANEL, PANEL, 2, half_k, cbuf,
                                nxt_wide, (q0 * nxt_lines + first) * CACHE_LINE, lines, kv, runs, cur)
            for i in range(rows):
                store_bf16_32(cbuf, PANEL * i, out, (r0 + i) * n + n0)


@njit(cache=True, parallel=True)
def int4_to_bf16_panels(packed: np.ndarray, sz: np.ndarray) -> np.ndarray:
    """An int4 weight (``packed [N/64, K, 32]``, ``sz [K/32, N]``: ``Int4PackedWeight.amx_operands``)
    widened once into the panels ``_int4_panels`` widens at every call: ``[N/32, K/2, 32]`` uint32,
    bf16 pairs, the same bits (4x the packed bytes)."""
    n = sz.shape[1]
    k = packed.shape[1]
    wide = np.empty((n // PANEL, k // 2, PANEL), np.uint32)
    tiles = wide.reshape(n // PANEL, k // GROUP, 16, PANEL)
    for p in prange(n // PANEL):
        widen_panel(packed, sz, p, tiles[p])
    return wide


_NO_RUNS = np.zeros((0, 3), np.int64)
NO_PANELS = np.zeros((0, 0, PANEL), np.uint32)  # ``_int4_panels``' ``wide`` where nothing is widened


@njit(cache=True, parallel=True)
def int4_dpbf16_matmul_then(x: np.ndarray, packed: np.ndarray, sz: np.ndarray, out: np.ndarray, n_threads: int,
                            nxt_packed: np.ndarray, nxt_sz: np.ndarray, then: bool) -> None:
    """``int4_dpbf16_matmul``, streaming in (with ``then``) the weight ``nxt_packed, nxt_sz`` that the
    next call takes, each thread the share it will multiply: a decode step's 30 layers of four int4
    matmuls at 32 rows read their weights from DRAM, 1.4 ms a step more than from cache."""
    x32 = x.view(np.uint32)
    n_panels = out.shape[1] // PANEL
    workers = max(1, min(n_threads, n_panels))
    nxt_panels = nxt_sz.shape[1] // PANEL
    nxt_workers = max(1, min(n_threads, nxt_panels))
    for w in prange(workers):
        q0 = w * nxt_panels // nxt_workers if then and w < nxt_workers else 0
        q1 = (w + 1) * nxt_panels // nxt_workers if then and w < nxt_workers else 0
        _int4_panels(x32, packed, sz, out, w * n_panels // workers, (w + 1) * n_panels // workers, nxt_packed,
                     nxt_sz, q0, q1, packed, _NO_RUNS, 0, 0, NO_PANELS, NO_PANELS)


@njit(cache=True)
def int4_dpbf16_matmul(x: np.ndarray, packed: np.ndarray, sz: np.ndarray, out: np.ndarray, n_threads: int) -> None:
    """``out [M, N] = x [M, K] @ W^T`` in bf16 bits (uint16, C-contiguous), ``N % 64 == 0``, ``K % 32 == 0``.

    ``packed`` is ATen's int4 weight viewed as ``[N/64, K, 32]``, ``sz`` its scale-zeros ``[K/32, N]``
    as uint32 (each the bf16 pair): ``Int4PackedWeight.amx_operands``.
    """
    int4_dpbf16_matmul_then(x, packed, sz, out, n_threads, packed, sz, False)


@njit(cache=True)
def _int8_panels(xt, qw, scale, out, p0, p1):
    """Output columns ``32 p0 : 32 p1`` of ``out [M, N]`` (float32): 32 weight rows widened to bf16
    pairs ``a [32, K/2]``, each 8 of them broadcast against 32 activation rows (``xt`` VNNI pairs)."""
    k = qw.shape[1]
    m = out.shape[0]
    mp = xt.shape[1]
    half_k = k // 2
    rows = np.empty((PANEL, k), np.uint16)
    a = rows.view(np.uint32)  # each weight row as bf16 pairs, low k in the low half
    cbuf = np.empty((BLOCK_ROWS, PANEL), np.float32)
    for p in range(p0, p1):
        n0 = p * PANEL
        for i in range(PANEL):
            for g in range(k // GROUP):
                widen_int8_32(qw, (n0 + i) * k + g * GROUP, rows, i * k + g * GROUP)
        for c0 in range(0, m, PANEL):
            vecs = 2 if m - c0 > 16 else 1
            for i0 in range(0, PANEL, BLOCK_ROWS):
                _dot_block(a, i0 * half_k, half_k, BLOCK_ROWS, xt, c0, mp, vecs, half_k, cbuf)
                for i in range(BLOCK_ROWS):
                    s = scale[n0 + i0 + i]
                    for j in range(min(16 * vecs, m - c0)):
                        out[c0 + j, n0 + i0 + i] = cbuf.flat[16 * vecs * i + j] * s


@njit(cache=True, parallel=True)
def int8_dpbf16_matmul(x: np.ndarray, qw: np.ndarray, scale: np.ndarray, out: np.ndarray, n_threads: int) -> None:
    """``out [M, N] = (x @ qw^T) * scale``: ``x`` bf16 bits (uint16), ``qw`` int8 ``[N, K]``, ``scale``
    float32 ``[N]``, ``N % 32 == 0``, ``K % 32 == 0``; ``out`` float32."""
    xt = vnni_transpose(x)
    n_panels = out.shape[1] // PANEL
    workers = max(1, min(n_threads, n_panels))
    for w in prange(workers):
        _int8_panels(xt, qw, scale, out, w * n_panels // workers, (w + 1) * n_panels // workers)


@njit(cache=True, parallel=True)
def int8_to_bf16_panels(qw: np.ndarray) -> np.ndarray:
    """``qw`` int8 ``[N, K]`` (``N % 32 == 0``, ``K`` even) as bf16 pairs in panels of 32 rows,
    ``[N/32, K/2, 32]`` uint32: ``panels[p, i, c]`` holds ``qw[32 p + c, 2i]`` (low half) and ``qw[32 p
    + c, 2i + 1]``. Exact (an int8 has at most 8 significant bits); the layout ``_dot_block`` reads."""
    n, k = qw.shape
    panels = np.empty((n // PANEL, k // 2, PANEL), np.uint32)
    for p in prange(n // PANEL):
        for c in range(PANEL):
            row = qw[p * PANEL + c]
            for i in range(k // 2):
                lo = np.float32(row[2 * i]).view(np.uint32) >> np.uint32(16)
                hi = np.float32(row[2 * i + 1]).view(np.uint32) & np.uint32(0xFFFF0000)
                panels[p, i, c] = lo | hi
    return panels


@njit(cache=True)
def _bf16_panels(x32, panels, scale, out, p0, p1):
    """Output columns ``32 p0 : 32 p1`` of ``out [M, N]`` (float32): every 8 rows of ``x32`` against
    each ready-widened panel, scaled per column."""
    m, half_k = x32.shape
    cbuf = np.empty((BLOCK_ROWS, PANEL), np.float32)
    panel_lines = half_k * PANEL * 4 // CACHE_LINE
    for p in range(p0, p1):
        n0 = p * PANEL
        for r0 in range(0, m, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, m - r0)
            first, lines = _lookahead_share(panel_lines if p + 1 < p1 else 0, m, r0)
            _dot_block_pf(x32, r0 * half_k, half_k, rows, panels, p * half_k * PANEL, PANEL, 2, half_k, cbuf, panels,
                          ((p + 1) * panel_lines + first) * CACHE_LINE, lines)
            for i in range(rows):
                for j in range(PANEL):
                    out[r0 + i, n0 + j] = cbuf[i, j] * scale[n0 + j]


@njit(cache=True, parallel=True)
def bf16_panels_matmul(x: np.ndarray, panels: np.ndarray, scale: np.ndarray, out: np.ndarray,
                       n_threads: int) -> None:
    """``int8_dpbf16_matmul`` on the weight widened beforehand (``int8_to_bf16_panels``): the same
    products in the same order, so the same float32 ``out [M, N]``, without widening 1 byte a weight
    every call (at 32 rows of a 49k x 576 head: 5.8-7.3 ms against 7.7-8.2 ms)."""
    x32 = x.view(np.uint32)
    n_panels = out.shape[1] // PANEL
    workers = max(1, min(n_threads, n_panels))
    for w in prange(workers):
        _bf16_panels(x32, panels, scale, out, w * n_panels // workers, (w + 1) * n_panels // workers)
