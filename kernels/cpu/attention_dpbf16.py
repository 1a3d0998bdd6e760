"""Decode attention's q.k scores on AVX512-BF16 (``vdpbf16ps``), for CPUs without AMX (AMD Zen 4,
Intel Cooper Lake), over a bf16 KV cache with head size 64 or 128 and blocks of 16n keys.

The AVX-512 decode kernel (``paged_attention._attend_decode``) widens every K element to float32 once
per query head and ends every key's dot product with a horizontal sum: about 20 instructions per key
and head for 64 multiply-adds. Here a key's bf16 row is multiplied as it is stored, in bf16 pairs:

- q is split into ``hi = bf16(q)`` and ``lo = bf16(q - hi)`` (16 bits of mantissa; the products are
  exact and accumulate in float32, as in ``attention_amx``), so a 64-dim key takes 4 ``vdpbf16ps``
  into one 16-lane vector of partial sums;
- the 16 keys of a block are then folded together in a tree of shuffles and adds (``_key_scores``):
  16 vectors of partial sums become one vector of 16 scores in 15 steps instead of 16 horizontal sums.

The softmax is the AVX-512 kernel's and ``p @ V`` is ``decode_pv``'s (the group's accumulators in
registers); prompt tiles stay on ``paged_attention._attend_tile``.

Paged blocks are scattered 2 KiB pieces that the hardware prefetchers barely help with, and a decode
step's cache comes from DRAM. Each block's scoring asks for the K and V rows ``PREFETCH_BLOCKS``
blocks ahead (into the next item's blocks at an item's end), into L2, between the keys' dot products:
each query head takes a share of the block's lines (``_prefetch_plan``), and key ``j`` asks for line
``j`` of that share in K and in V (``prefetch.spread_prefetches``), at offsets fixed when compiled
from two pointers made once a call. Asked for in bursts of a block, the same prefetches stalled the
dot products' loads: 32 streams' decode attention over a cold cache took 1.45-1.55x as long
(``bench_kernels attention``); asked into L1 they held its few miss buffers, 1.3-1.4x as long on a
Zen 4. Until round 48 every prefetch chose between K and V and computed its address at run time
(~10 integer instructions a line, 4 lines a key): 32 streams' decode attention over 256 warm keys
took 1.10x as long on one Zen 4 thread. An int8 cache
keeps the burst scheme (``_prefetch_blocks``), which measured better for its shorter rows.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from edgellm.kernels.cpu.amx import _BFloat, element_ptr
from edgellm.kernels.cpu.attention_amx import split_bf16_32
from edgellm.kernels.cpu.attention_vnni_int8 import prepare_q_i8, run_keys_i8, run_scores_i8
from edgellm.kernels.cpu.attention_vnni_int8 import supports as supports_int8
from edgellm.kernels.cpu.dpbf16 import _dp
from edgellm.kernels.cpu.dpbf16 import supported as dpbf16_supported
from edgellm.kernels.cpu.key_fold import KEYS, emit_folded_scores
from edgellm.kernels.cpu.paged_attention import (
    DECODE_MAX_KEYS,
    FASTMATH,
    _attend_tile,
    _decode_finish,
    _decode_softmax,
    _merge_partials,
    _plan,
    dealt_items,
    decode_pv,
    heads_unit,
    rope_and_write,
    write_kv,
)
from edgellm.kernels.cpu.prefetch import (
    CACHE_LINE,
    prefetch_rows,
    prefetch_rows_l2,
    spread_plan,
    spread_prefetches,
)
from edgellm.kernels.cpu.unmanaged import keep_alive, unmanaged

HEAD_DIMS = (64, 128)
MAX_GROUP = 16
# how many cache blocks ahead of the one being scored a decode item prefetches
PREFETCH_BLOCKS = 2


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether this CPU and a cache ``kv [2, blocks, Hkv, block_size, D]`` (uint16 = bf16 bits) with a
    GQA group size take this kernel; an int8 cache takes it with ``attention_vnni_int8``'s scoring."""
    if kv.dtype == np.int8:
        return dpbf16_supported() and supports_int8(kv, group)
    return (kv.dtype == np.uint16 and kv.shape[4] in HEAD_DIMS and kv.shape[3] % KEYS == 0
            and 1 <= group <= MAX_GROUP and dpbf16_supported())


@intrinsic(prefer_literal=True)
def _key_scores(typingctx, kv, k0, q2, q0, halves, out, o0, k_byte, v_byte, l0, l1):
    """``out[o0 + j] = sum_p bf16x2(kv32[k0 / 2 + j 16 halves + p]) . (hi + lo)`` for the 16 keys
    ``j`` of a block row run starting at element ``k0`` of the flat bf16 cache ``kv``, where ``hi``
    and ``lo`` are the query's pairs ``q2[q0 + p]`` and ``q2[q0 + 16 halves + p]``, ``p < 16 halves``
    (``halves`` = head size / 32, a compile-time constant). Between the keys it prefetches lines
    ``l0:l1`` of a later block's K rows (at byte ``k_byte``) and V rows (``v_byte``)
    (``prefetch.spread_prefetches``)."""
    if not (isinstance(halves, types.IntegerLiteral) and halves.literal_value in (2, 4)):
        return None
    if not (isinstance(kv, types.Array) and kv.dtype == types.uint16 and isinstance(q2, types.Array)
            and q2.dtype == types.uint32 and isinstance(out, types.Array) and out.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        t_kv, t_k0, t_q, t_q0, _, t_out, t_o0 = sig.args[:7]
        v_kv, v_k0, v_q, v_q0, _, v_out, v_o0 = args[:7]
        plan = spread_plan(context, builder, (t_kv,) + sig.args[7:], (v_kv,) + args[7:])
        n_half = halves.literal_value
        v16f, v32b = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_BFloat(), 32)
        as64 = lambda v, t: context.cast(builder, v, t, types.int64)  # noqa: E731
        k0, q0 = as64(v_k0, t_k0), as64(v_q0, t_q0)
        dp = _dp(builder)

        def load(t, v, index, offset):
            return builder.bitcast(builder.load(element_ptr(context, builder, t, v, index, types.int64, v32b,
                                                            offset=offset), align=4), v32b)

        qv = [load(t_q, v_q, q0, 16 * h) for h in range(2 * n_half)]  # hi halves, then lo halves
        zero = ir.Constant(v16f, None)
        leaves = []
        for j in range(KEYS):
            acc = zero
            for h in range(n_half):
                k = load(t_kv, v_kv, k0, 32 * n_half * j + 32 * h)
                acc = builder.call(dp, [acc, qv[h], k])
                acc = builder.call(dp, [acc, qv[n_half + h], k])
            leaves.append(acc)
            spread_prefetches(builder, plan, j, KEYS)

        scores = emit_folded_scores(builder, leaves, builder.fadd)
        ptr = element_ptr(context, builder, t_out, v_out, as64(v_o0, t_o0), types.int64, v16f)
        builder.store(scores, ptr, align=4)
        return context.get_dummy_value()

    return types.void(kv, k0, q2, q0, halves, out, o0, k_byte, v_byte, l0, l1), codegen


@njit(cache=True, inline="always")
def _block_scores(kv_flat, k0, q2, q0, head_dim, out, o0, pf):
    if head_dim == 64:
        _key_scores(kv_flat, k0, q2, q0, 2, out, o0, pf[0], pf[1], pf[2], pf[3])
    else:
        _key_scores(kv_flat, k0, q2, q0, 4, out, o0, pf[0], pf[1], pf[2], pf[3])


@njit(cache=True, fastmath=FASTMATH)
def _prepare_q_bf16(q_flat, t, hk, n_heads, scale, q2_16, q_row):
    """``q2`` rows (here as ``q2_16``, their bf16 halves): each query head's hi pairs, then its lo
    pairs, one head after another."""
    head_dim = q_row.shape[0]
    group = q2_16.shape[0] // (2 * head_dim)
    for g in range(group):
        base = (t * n_heads + hk * group + g) * head_dim
        for d in range(head_dim):
            q_row[d] = q_flat[base + d] * scale
        for i in range(0, head_dim, 32):
            split_bf16_32(q_row, i, q2_16, 2 * g * head_dim + i, q2_16, (2 * g + 1) * head_dim + i)


# The cache dtype's scoring behind one decode loop (``_attend_decode_dp``). Its scratch comes as plain
# arrays, each dtype using its own: arrays taken out of a tuple count references at every use, and at
# a call per 16 keys and head that cost the int8 kernel half its speed.

def _prepare_q(kv, q_flat, t, hk, n_heads, scale, q2_16, xq, q_row, q_scales):
    """Decode row ``t``'s query heads of kv head ``hk``, times ``scale``, as the scoring takes them."""
    raise NotImplementedError("only callable from Numba code")


@overload(_prepare_q)
def _prepare_q_impl(kv, q_flat, t, hk, n_heads, scale, q2_16, xq, q_row, q_scales):
    if kv.dtype == types.int8:
        def int8(kv, q_flat, t, hk, n_heads, scale, q2_16, xq, q_row, q_scales):
            prepare_q_i8(q_flat, t, hk, n_heads, scale, xq, q_row, q_scales)
        return int8

    def bf16(kv, q_flat, t, hk, n_heads, scale, q2_16, xq, q_row, q_scales):
        _prepare_q_bf16(q_flat, t, hk, n_heads, scale, q2_16, q_row)
    return bf16


def _run_keys(kv, kv_flat, row, k_scales):
    """What a run of 16 keys needs before its heads are scored: an int8 cache's row scales."""
    raise NotImplementedError("only callable from Numba code")


@overload(_run_keys, inline="always")
def _run_keys_impl(kv, kv_flat, row, k_scales):
    if kv.dtype == types.int8:
        return lambda kv, kv_flat, row, k_scales: run_keys_i8(kv, kv_flat, row, k_scales)
    return lambda kv, kv_flat, row, k_scales: None


def _run_scores(kv, kv_flat, row, g, q2, xq, q_scales, k_scales, out, o0, pf):
    """``out[o0:o0 + 16]``: query head ``g``'s scores of the 16 keys of cache rows ``row:row + 16``,
    prefetching as the plan ``pf`` (``_prefetch_plan``) says."""
    raise NotImplementedError("only callable from Numba code")


@overload(_run_scores, inline="always")
def _run_scores_impl(kv, kv_flat, row, g, q2, xq, q_scales, k_scales, out, o0, pf):
    if kv.dtype == types.int8:  # prefetches by whole blocks (``_prefetch_blocks``)
        def int8(kv, kv_flat, row, g, q2, xq, q_scales, k_scales, out, o0, pf):
            run_scores_i8(kv, kv_flat, row, g, xq, q_scales, k_scales, out, o0)
        return int8

    def bf16(kv, kv_flat, row, g, q2, xq, q_scales, k_scales, out, o0, pf):
        head_dim = kv.shape[4]
        _block_scores(kv_flat, row * head_dim, q2, g * head_dim, head_dim, out, o0, pf)
    return bf16


def _prefetch_blocks(kv, table, bi, first, last, hk, nxt_table, nxt_hk, nxt_b0, nxt_nb):
    """An int8 cache's prefetching at block ``bi`` of a decode item (blocks ``first:last + 1``): the
    next K block and this V block into L1, a share of the next item's blocks into L2. A bf16 cache's
    rows are prefetched between its keys' dot products instead (``_prefetch_plan``): cold 32-stream
    decode attention 1.45-1.55x faster that way, where int8 scoring got 0.8x."""
    raise NotImplementedError("only callable from Numba code")


@overload(_prefetch_blocks, inline="always")
def _prefetch_blocks_impl(kv, table, bi, first, last, hk, nxt_table, nxt_hk, nxt_b0, nxt_nb):
    if kv.dtype != types.int8:
        return lambda kv, table, bi, first, last, hk, nxt_table, nxt_hk, nxt_b0, nxt_nb: None

    def int8(kv, table, bi, first, last, hk, nxt_table, nxt_hk, nxt_b0, nxt_nb):
        i, n_blocks = bi - first, last - first + 1
        for j in range(i * nxt_nb // n_blocks, (i + 1) * nxt_nb // n_blocks):
            prefetch_rows_l2(kv[0, nxt_table[nxt_b0 + j], nxt_hk])
            prefetch_rows_l2(kv[1, nxt_table[nxt_b0 + j], nxt_hk])
        if bi < last:
            prefetch_rows(kv[0, table[bi + 1], hk])
        prefetch_rows(kv[1, table[bi], hk])
    return int8


@njit(cache=True, inline="always")
def _prefetch_plan(kv, block, hk, g, group):
    """Query head ``g``'s share (of ``group``) of prefetching cache block ``block``'s K and V rows of
    kv head ``hk`` (none for ``block < 0`` or an int8 cache): ``(k_byte, v_byte, l0, l1)``, lines
    ``l0:l1`` of the K rows at byte ``k_byte`` and of the V rows at ``v_byte``."""
    chunk = kv.shape[3] * kv.shape[4] * kv.itemsize
    if block < 0 or kv.itemsize == 1:
        return 0, 0, 0, 0
    lines = chunk // CACHE_LINE
    k_byte = (block * kv.shape[2] + hk) * chunk
    return k_byte, k_byte + kv.shape[1] * kv.shape[2] * chunk, g * lines // group, (g + 1) * lines // group


@njit(cache=True, fastmath=FASTMATH)
def _attend_decode_dp(out, q_flat, kv, kv_flat, table, lo, hi, t, hk, scale, soft_cap, partials, slot, n_heads,
                      q2, q2_16, xq, q_row, q_scales, k_scales, blk, scores, scores_flat, maxes, sums, acc,
                      nxt_table, nxt_hk, nxt_b0, nxt_nb):
    """``paged_attention._attend_decode`` with the scores on ``vdpbf16ps`` (bf16 cache) or ``vpdpwssd``
    (int8): one decode row, kv head ``hk``, keys ``lo:hi``; the same outputs and partials
    (``_run_items_dp`` owns the scratch)."""
    group = n_heads // kv.shape[2]
    block_size = kv.shape[3]
    n = hi - lo
    n_scores = scores.shape[1]
    _prepare_q(kv, q_flat, t, hk, n_heads, scale, q2_16, xq, q_row, q_scales)
    first, last = lo // block_size, (hi - 1) // block_size
    for bi in range(first, last + 1):
        # the K and V rows PREFETCH_BLOCKS ahead (into the next item's once this one's run out) are
        # asked for between the keys of this block's first run, a share with each query head
        ahead, ahead_hk = bi + PREFETCH_BLOCKS, hk
        ahead_block = table[ahead] if ahead <= last else -1
        if ahead > last and ahead - last - 1 < nxt_nb:
            ahead_block, ahead_hk = nxt_table[nxt_b0 + ahead - last - 1], nxt_hk
        _prefetch_blocks(kv, table, bi, first, last, hk, nxt_table, nxt_hk, nxt_b0, nxt_nb)
        row0 = (table[bi] * kv.shape[2] + hk) * block_size
        base = bi * block_size
        for s in range(0, block_size, KEYS):
            j0, j1 = max(lo - base - s, 0), min(hi - base - s, KEYS)
            if j0 >= j1:
                continue
            _run_keys(kv, kv_flat, row0 + s, k_scales)
            for g in range(group):
                pf = _prefetch_plan(kv, ahead_block if s == 0 else -1, ahead_hk, g, group)
                if j1 - j0 == KEYS:  # a whole run: straight into the scores
                    _run_scores(kv, kv_flat, row0 + s, g, q2, xq, q_scales, k_scales, scores_flat,
                                g * n_scores + base + s - lo, pf)
                    continue
                _run_scores(kv, kv_flat, row0 + s, g, q2, xq, q_scales, k_scales, blk, 0, pf)
                for j in range(j0, j1):
                    scores[g, base + s + j - lo] = blk[j]
    _decode_softmax(scores, group, n, soft_cap, maxes, sums)
    acc[:] = 0
    decode_pv(kv, table, lo, hi, hk, scores, acc)
    _decode_finish(out, acc, maxes, sums, partials, slot, t, hk, group)


@njit(cache=True, inline="always")
def _next_decode(kv, block_tables, items, item):
    """The blocks ``(table, kv head, first block, count)`` of decode item ``item``, which the item
    before it prefetches: its first ``PREFETCH_BLOCKS`` (bf16), or a share at a time (int8). Count 0
    for a prompt tile, whose reads are few."""
    b = items[item, 0]
    block_size = kv.shape[3]
    first = items[item, 4] // block_size
    count = (items[item, 5] - 1) // block_size + 1 - first
    if items[item, 7] < 0:
        count = 0
    return block_tables[b], items[item, 1], first, count


@njit(cache=True)
def _run_items_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                  partials, worker, n_workers):
    """``paged_attention._run_items`` with decodes' scores on ``vdpbf16ps`` or ``vpdpwssd``."""
    out, q, kv, query_start_loc, block_tables = (unmanaged(out), unmanaged(q), unmanaged(kv),
                                                 unmanaged(query_start_loc), unmanaged(block_tables))
    seq_lens, items, order, partials = unmanaged(seq_lens), unmanaged(items), unmanaged(order), unmanaged(partials)
    scale32 = np.float32(scale)
    cap32 = np.float32(soft_cap)
    head_dim = q.shape[2]
    n_heads = q.shape[1]
    group = n_heads // kv.shape[2]
    # scratch made once per thread, passed on as unmanaged views of the owners kept below
    q2_own = np.empty(group * head_dim, np.uint32)  # bf16: q's hi and lo pairs
    xq_own = np.empty(group * head_dim, np.int16)  # int8: q's codes
    # one float32 buffer, its vector rows first, each at a multiple of 16 floats as separate arrays were
    f32 = np.empty(group * DECODE_MAX_KEYS + group * head_dim + head_dim + 2 * KEYS + 3 * group, np.float32)
    q2, xq, f32u = unmanaged(q2_own), unmanaged(xq_own), unmanaged(f32)
    q2_16 = q2.view(np.uint16)
    scores_flat = f32u[:group * DECODE_MAX_KEYS]
    scores = scores_flat.reshape(group, DECODE_MAX_KEYS)
    at = group * DECODE_MAX_KEYS
    acc = f32u[at:at + group * head_dim].reshape(group, head_dim)
    at += group * head_dim
    q_row, k_scales, blk = f32u[at:at + head_dim], f32u[at + head_dim:at + head_dim + KEYS], f32u[
        at + head_dim + KEYS:at + head_dim + 2 * KEYS]
    at += head_dim + 2 * KEYS
    q_scales, sums, maxes = f32u[at:at + group], f32u[at + group:at + 2 * group], f32u[at + 2 * group:at + 3 * group]
    q_flat = q.reshape(-1)
    kv_flat = kv.reshape(-1)
    mine = dealt_items(order, worker, n_workers, heads_unit(order.shape[0], kv.shape[2], n_workers))
    for i in range(mine.shape[0]):
        item = mine[i]
        b = items[item, 0]
        seq_q0 = query_start_loc[b]
        nq = query_start_loc[b + 1] - seq_q0
        if items[item, 7] >= 0:
            nxt_table, nxt_hk, nxt_b0, nxt_nb = block_tables[b], 0, 0, 0
            if i + 1 < mine.shape[0]:
                nxt_table, nxt_hk, nxt_b0, nxt_nb = _next_decode(kv, block_tables, items, mine[i + 1])
            _attend_decode_dp(out, q_flat, kv, kv_flat, block_tables[b], items[item, 4], items[item, 5],
                              items[item, 7],
                              items[item, 1], scale32, cap32, partials, items[item, 6], n_heads, q2, q2_16, xq,
                              q_row, q_scales, k_scales, blk, scores, scores_flat, maxes, sums, acc,
                              nxt_table, nxt_hk, nxt_b0, nxt_nb)
            continue
        _attend_tile(out, q, kv, block_tables[b], seq_lens[b], seq_q0, nq, items[item, 2],
                     items[item, 3], items[item, 1], scale32, window, cap32)
    keep_alive(q2_own)
    keep_alive(xq_own)
    keep_alive(f32)


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
def _attention_dp_serial(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile):
    """``_attention_dp`` on the calling thread (steps too small to wake the pool for)."""
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    _run_items_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                  partials, 0, 1)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def attend_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads):
    """``paged_attention.attend`` with decodes' scores on ``vdpbf16ps`` (``supports(kv, group)``)."""
    if n_threads > 1:
        _attention_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile,
                      n_threads)
    else:
        _attention_dp_serial(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile)


@njit(cache=True)
def paged_attention_step_dp(out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: np.ndarray,
                            slot_mapping: np.ndarray, query_start_loc: np.ndarray, seq_lens: np.ndarray,
                            block_tables: np.ndarray, scale: float, window: int, soft_cap: float, q_tile: int,
                            n_threads: int) -> None:
    """``paged_attention.paged_attention_step`` with decodes' scores on ``vdpbf16ps``."""
    write_kv(kv, k, v, slot_mapping)
    attend_dp(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads)


@njit(cache=True)
def rope_attention_step_dp(out: np.ndarray, qkv: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray,
                           kv: np.ndarray, slot_mapping: np.ndarray, query_start_loc: np.ndarray,
                           seq_lens: np.ndarray, block_tables: np.ndarray, scale: float, window: int,
                           soft_cap: float, q_tile: int, n_threads: int) -> None:
    """``paged_attention.rope_attention_step`` with decodes' scores on ``vdpbf16ps``."""
    q_rot, _ = rope_and_write(qkv, positions, cos_sin, kv, slot_mapping, out.shape[1])
    attend_dp(out, q_rot, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads)
