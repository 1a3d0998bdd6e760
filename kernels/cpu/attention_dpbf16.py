"""Decode attention with AVX512-BF16 dot products, for a bf16 KV cache with head size 64 on CPUs
without AMX (AMD Zen 4 and later).

The same arithmetic as the AMX kernel (``attention_amx``), on ``vdpbf16ps`` register blocks
(``dpbf16.dot_rows``):

- scores: each K row's bf16 pairs are broadcast against Q^T, whose 16 lanes hold the group's query
  heads split into ``hi = bf16(q)`` and ``lo = bf16(q - hi)``; 8 keys a call, K read in place;
- output: P's rows (hi and lo of each head) broadcast in pairs of keys against V rows interleaved
  in pairs (VNNI), 32 dims a vector.

``hi + lo`` carries 16 bits of mantissa and the products accumulate in float32, so the results match
the float32 kernel closely. The softmax between the two products is the AVX-512 kernel's; prompt
tiles and other cache shapes stay on the AVX-512 kernels.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr
from edgellm.kernels.cpu.attention_amx import PREFETCH_STEP, _k_row, _split_row
from edgellm.kernels.cpu.dpbf16 import BLOCK_ROWS, dot_rows
from edgellm.kernels.cpu.paged_attention import (
    DECODE_KEYS_PER_ITEM,
    _attend_tile,
    _decode_finish,
    _decode_softmax,
    _exp_rows,
    _merge_partials,
    _plan,
    dealt_items,
    rope_and_write,
    write_kv,
)
from edgellm.kernels.cpu.prefetch import prefetch

HEAD_DIM = 64
KEYS = 8  # keys per scores call
MAX_GROUP = 8  # query heads per kv head: hi and lo of each fill at most 16 lanes
MAX_KEYS = DECODE_KEYS_PER_ITEM + 2  # an item's keys, rounded up to whole pairs


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether a cache ``kv [2, blocks, Hkv, block_size, D]`` (uint16 = bf16 bits) and a GQA group
    size take this kernel."""
    return (kv.dtype == np.uint16 and kv.shape[4] == HEAD_DIM and kv.shape[3] % KEYS == 0
            and 1 <= group <= MAX_GROUP)


@intrinsic
def _pair_rows(typingctx, src, a_index, b_index, dst, dst_index):
    """Interleave two 64-element bf16 rows of ``src`` (flat offsets ``a_index``, ``b_index``): the
    uint32 ``dst.flat[dst_index + d]`` holds ``(a[d], b[d])`` for ``d < 64``."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint16 and isinstance(dst, types.Array)
            and dst.dtype == types.uint32 and all(isinstance(t, types.Integer) for t in (a_index, b_index, dst_index))):
        return None

    def codegen(context, builder, sig, args):
        v64 = ir.VectorType(ir.IntType(16), HEAD_DIM)
        ra = builder.load(element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v64), align=2)
        rb = builder.load(element_ptr(context, builder, sig.args[0], args[0], args[2], sig.args[2], v64), align=2)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 2 * HEAD_DIM),
                           [i // 2 + (HEAD_DIM if i % 2 else 0) for i in range(2 * HEAD_DIM)])
        row = builder.shuffle_vector(ra, rb, mask)
        builder.store(row, element_ptr(context, builder, sig.args[3], args[3], args[4], sig.args[4], row.type), align=4)
        return context.get_dummy_value()

    return types.void(src, a_index, b_index, dst, dst_index), codegen


@njit(cache=True)
def _attend_decode_dp(out, q_flat, n_heads, kv, kv32, table, lo, hi, t, hk, scale, soft_cap, partials, slot, qb32,
                      sc, scores, exp_bits, pa, vb, acc, cbuf, maxes, sums, q_row, q_hi, q_lo):
    """``paged_attention._attend_decode`` for one decode row, kv head ``hk``, keys ``lo:hi``; the same
    outputs and partials. ``qb32`` and ``pa`` hold zeros past their first ``2 group`` lanes and rows
    (``_run_items_dp`` zeroes them once)."""
    group = n_heads // kv.shape[2]
    block_size = kv.shape[3]
    n = hi - lo
    hi32, lo32 = q_hi.view(np.uint32), q_lo.view(np.uint32)
    for g in range(group):  # Q^T: pair p of lane (hi: g, lo: group + g) at qb32[16 p + lane]
        base = (t * n_heads + hk * group + g) * HEAD_DIM
        for d in range(HEAD_DIM):
            q_row[d] = q_flat[base + d] * scale
        _split_row(q_row, 0, HEAD_DIM, q_hi, q_lo)
        for p in range(HEAD_DIM // 2):
            qb32[16 * p + g] = hi32[p]
            qb32[16 * p + group + g] = lo32[p]
    flat = kv.reshape(-1)
    v_off = kv.shape[1] * kv.shape[2] * block_size * HEAD_DIM  # kv[1] starts here
    b_first = lo // block_size
    b_last = (hi - 1) // block_size
    for bi in range(b_first, b_last + 1):
        row = _k_row(kv, table, hk, bi * block_size)
        # scattered 2 KiB blocks start the hardware prefetchers cold: ask for this block's V rows and
        # the next block's K rows while this one is scored
        for e in range(0, block_size * HEAD_DIM, PREFETCH_STEP):
            prefetch(flat, v_off + row + e)
        if bi < b_last:
            nxt = _k_row(kv, table, hk, (bi + 1) * block_size)
            for e in range(0, block_size * HEAD_DIM, PREFETCH_STEP):
                prefetch(flat, nxt + e)
        for j0 in range(0, block_size, KEYS):
            dot_rows(kv32, (row + j0 * HEAD_DIM) // 2, HEAD_DIM // 2, KEYS, qb32, 0, 16, 1, HEAD_DIM // 2, sc,
                     ((bi - b_first) * block_size + j0) * 16)
    off = lo - b_first * block_size
    for g in range(group):  # each head's scores (hi and lo lanes summed) and their max
        srow = scores[g]
        m = sc[off, g] + sc[off, group + g]
        srow[0] = m
        for j in range(1, n):
            s = sc[off + j, g] + sc[off + j, group + g]
            srow[j] = s
            m = max(m, s)
        maxes[g] = m
    if soft_cap > 0:
        maxes, sums = _decode_softmax(scores, group, n, soft_cap, exp_bits)
    else:
        _exp_rows(scores, maxes, sums, group, n, exp_bits)
    # p @ V: V rows interleaved in key pairs; P's rows (hi, then lo) broadcast a pair of keys at a time
    pairs = (n + 1) // 2
    for g in range(group):
        _split_row(scores[g], 0, n, pa[g], pa[group + g])  # zeros past n: the odd key's partner is 0
    key = lo
    bi, o = key // block_size, key % block_size
    for r in range(pairs):
        row_a = v_off + ((table[bi] * kv.shape[2] + hk) * block_size + o) * HEAD_DIM
        o += 1
        if o == block_size:
            bi += 1
            o = 0
        row_b = row_a
        if 2 * r + 1 < n:
            row_b = v_off + ((table[bi] * kv.shape[2] + hk) * block_size + o) * HEAD_DIM
            o += 1
            if o == block_size:
                bi += 1
                o = 0
        _pair_rows(flat, row_a, row_b, vb, r * HEAD_DIM)  # a lone last key pairs with itself, times p = 0
    pa32 = pa.reshape(-1).view(np.uint32)
    stride = pa.shape[1] // 2
    for c0 in range(0, HEAD_DIM, 32):
        for r0 in range(0, 2 * group, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, 2 * group - r0)
            dot_rows(pa32, r0 * stride, stride, rows, vb, c0, HEAD_DIM, 2, pairs, cbuf, 0)
            for i in range(rows):
                for d in range(32):
                    acc[r0 + i, c0 + d] = cbuf[i, d]
    for g in range(group):
        for d in range(HEAD_DIM):
            acc[g, d] += acc[group + g, d]
    _decode_finish(out, acc, maxes, sums, partials, slot, t, hk, group)


@njit(cache=True)
def _run_items_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                  partials, worker, n_workers):
    """``paged_attention._run_items`` with decodes on ``vdpbf16ps``."""
    scale32 = np.float32(scale)
    cap32 = np.float32(soft_cap)
    group = q.shape[1] // kv.shape[2]
    block_size = kv.shape[3]
    qb32 = np.zeros(16 * HEAD_DIM // 2, np.uint32)
    sc = np.empty((DECODE_KEYS_PER_ITEM + 2 * block_size, 16), np.float32)
    scores = np.empty((group, DECODE_KEYS_PER_ITEM), np.float32)
    exp_bits = np.empty(DECODE_KEYS_PER_ITEM, np.int32)
    pa = np.zeros((2 * group, MAX_KEYS), np.uint16)
    vb = np.empty(MAX_KEYS // 2 * HEAD_DIM, np.uint32)
    acc = np.empty((2 * group, HEAD_DIM), np.float32)
    cbuf = np.empty((BLOCK_ROWS, 32), np.float32)
    q_row = np.empty(HEAD_DIM, np.float32)
    q_hi = np.empty(HEAD_DIM, np.uint16)
    q_lo = np.empty(HEAD_DIM, np.uint16)
    maxes = np.empty(group, np.float32)
    sums = np.empty(group, np.float32)
    q_flat = q.reshape(-1)
    kv32 = kv.reshape(-1).view(np.uint32)
    for item in dealt_items(order, worker, n_workers):
        b = items[item, 0]
        seq_q0 = query_start_loc[b]
        nq = query_start_loc[b + 1] - seq_q0
        if nq == 1:
            _attend_decode_dp(out, q_flat, q.shape[1], kv, kv32, block_tables[b], items[item, 4], items[item, 5],
                              seq_q0, items[item, 1], scale32, cap32, partials, items[item, 6], qb32, sc, scores,
                              exp_bits, pa, vb, acc, cbuf, maxes, sums, q_row, q_hi, q_lo)
            continue
        _attend_tile(out, q, kv, block_tables[b], seq_lens[b], seq_q0, nq, items[item, 2],
                     items[item, 3], items[item, 1], scale32, window, cap32)


@njit(cache=True, parallel=True)
def _attention_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads):
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    n_workers = max(1, min(n_threads, order.shape[0]))
    for w in prange(n_workers):
        _run_items_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                      partials, w, n_workers)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def _attend_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads):
    """``_attention_dp`` on ``n_threads`` threads, or all of it on the calling thread when it is 1."""
    if n_threads > 1:
        _attention_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile,
                      n_threads)
        return
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    _run_items_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                  partials, 0, 1)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def paged_attention_step_dp(out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: np.ndarray,
                            slot_mapping: np.ndarray, query_start_loc: np.ndarray, seq_lens: np.ndarray,
                            block_tables: np.ndarray, scale: float, window: int, soft_cap: float, q_tile: int,
                            n_threads: int) -> None:
    """``paged_attention.paged_attention_step`` with decodes on ``vdpbf16ps`` (``supports(kv, group)``)."""
    write_kv(kv, k, v, slot_mapping)
    _attend_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads)


@njit(cache=True)
def rope_attention_step_dp(out: np.ndarray, qkv: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray,
                           kv: np.ndarray, slot_mapping: np.ndarray, query_start_loc: np.ndarray,
                           seq_lens: np.ndarray, block_tables: np.ndarray, scale: float, window: int,
                           soft_cap: float, q_tile: int, n_threads: int) -> None:
    """``paged_attention.rope_attention_step`` with decodes on ``vdpbf16ps``."""
    q_rot, _ = rope_and_write(qkv, positions, cos_sin, kv, slot_mapping, out.shape[1])
    _attend_dp(out, q_rot, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads)
