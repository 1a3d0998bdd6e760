"""Paged attention on the CPU in Numba: prefill chunks and decodes of a ragged batch in one call.

K/V are read in place from the block pool ``kv [2, num_blocks, Hkv, block_size, D]`` through each
sequence's block table; nothing is gathered. The cache may be float32, bfloat16 stored as uint16
(widened per block by a 16-bit shift, which is exact) or int8 rows with their scales
(``kv_int8``: ``[..., D + 4]``; scores and probabilities take each row's scale). Work items are (sequence, kv head, query tile):
each K/V block is read once per tile and shared by the tile's queries and the group's query heads
(GQA), and a long prefill splits into many tiles so every thread has work even for one sequence.
Softmax is online (flash style) in float32.

Example::

    out = np.empty_like(q)
    paged_attention_step(out, q, k, v, kv, slot_mapping, query_start_loc, seq_lens, block_tables,
                         scale=0.125, window=0, soft_cap=0.0, q_tile=16, n_threads=2)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from edgellm.kernels.cpu.bf16 import as_f32 as _f32
from edgellm.kernels.cpu.bf16 import from_f32, load_row, store_row
from edgellm.kernels.cpu.decode_pv import decode_pv
from edgellm.kernels.cpu.expf import exp_f32
from edgellm.kernels.cpu.kv_int8 import SCALE_BYTES, dequantize_block, scale_of
from edgellm.kernels.cpu.norm_rope import rope_neox_qk
from edgellm.kernels.cpu.prefetch import CACHE_LINE, prefetch, prefetch_rows
from edgellm.kernels.cpu.unmanaged import flat, keep_alive, unmanaged

# 'reassoc' lets LLVM vectorize the q.k dot product and 'contract' fuse multiply-adds; both only
# change rounding. No 'nnan'/'ninf': masked scores and the running max start at -inf.
FASTMATH = {"reassoc", "contract"}
DEFAULT_Q_TILE = 16
# A decode's keys per work item: a context of c keys splits into up to c // 256 equal ranges that threads
# share (flash-decoding, ``_decode_range``), so no range holds more than DECODE_MAX_KEYS.
DECODE_KEYS_PER_ITEM = 256
DECODE_MAX_KEYS = 2 * DECODE_KEYS_PER_ITEM
# In a step of decodes, a sequence with up to this many query rows (the token fed back and the
# speculative drafts verified after it) attends row by row on the decode kernels, each row over the
# keys before it: 8 two-row sequences among 32 cost 4-8 ms more a step as prompt tiles (30 layers)
ROW_DECODES = 8


def _block_f32(src, scratch):
    """A C-contiguous ``[block_size, D]`` K or V block as float32: the block itself, its bf16 bits
    widened into ``scratch`` (uint32, ``block_size * D`` of them) in one flat pass, or an int8
    block's ``[block_size, D + 4]`` rows dequantized there."""
    raise NotImplementedError("only callable from Numba code")


@overload(_block_f32, inline="always")
def _block_f32_impl(src, scratch):
    if src.dtype == types.int8:
        def dequantized(src, scratch):
            n, dim = src.shape[0], src.shape[1] - SCALE_BYTES
            out = scratch.view(np.float32)[:n * dim].reshape(n, dim)
            dequantize_block(src, out)
            return out
        return dequantized
    return lambda src, scratch: load_row(src.reshape(-1), scratch).reshape(src.shape)


def _head(x, t, h, dim):
    """Head ``h`` of token ``t``: ``x[t, h]`` of a ``[T, H, D]`` array, or the ``dim`` columns from
    ``h * dim`` of a ``[T, H * D]`` one (rows of a fused projection)."""
    raise NotImplementedError("only callable from Numba code")


@overload(_head, inline="always")
def _head_impl(x, t, h, dim):
    if isinstance(x, types.Array) and x.ndim == 3:
        return lambda x, t, h, dim: x[t, h]
    if isinstance(x, types.Array) and x.ndim == 2:
        return lambda x, t, h, dim: x[t, h * dim:(h + 1) * dim]
    return None


@njit(cache=True)
def write_kv(kv: np.ndarray, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray) -> None:
    """Store this step's ``k, v [T, Hkv, D]`` (float32 or bf16 bits; ``v`` may also be ``[T, Hkv * D]``
    rows) at their cache slots (int8 caches quantize each row); negative slots skip."""
    kv, k, v, slot_mapping = unmanaged(kv), unmanaged(k), unmanaged(v), unmanaged(slot_mapping)
    block_size, dim = kv.shape[3], k.shape[2]
    wide_own = np.empty(dim, np.uint32)
    wide = unmanaged(wide_own)
    for t in range(k.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:
            continue
        blk = slot // block_size
        off = slot % block_size
        for h in range(k.shape[1]):
            store_row(kv[0, blk, h, off], load_row(k[t, h], wide))
            _store_v(kv[1, blk, h, off], _head(v, t, h, dim), wide)
    keep_alive(wide_own)


def _store_v(dst, src, wide):
    """``store_row(dst, load_row(src, wide))``: a bf16 row into a bf16 cache is copied as it is
    (widening it and rounding it back gives the same bits)."""
    raise NotImplementedError("only callable from Numba code")


@overload(_store_v, inline="always")
def _store_v_impl(dst, src, wide):
    if dst.dtype == types.uint16 and src.dtype == types.uint16:
        def copy(dst, src, wide):
            for d in range(src.shape[0]):
                dst[d] = src[d]
        return copy
    return lambda dst, src, wide: store_row(dst, load_row(src, wide))


@njit(cache=True, parallel=True)
def write_kv_parallel(kv: np.ndarray, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray, n_threads: int) -> None:
    """``write_kv`` with the tokens split into ``n_threads`` ranges (a prompt chunk's many rows)."""
    rows = k.shape[0]
    for w in prange(n_threads):
        r0, r1 = w * rows // n_threads, (w + 1) * rows // n_threads
        write_kv(kv, k[r0:r1], v[r0:r1], slot_mapping[r0:r1])


@njit(cache=True, fastmath=FASTMATH)
def _exp_shifted(s: np.ndarray, j0: int, j1: int, shift: np.float32) -> np.float32:
    """``s[j] = exp(s[j] - shift)`` for ``j0 <= j < j1`` (all arguments <= 0); returns their sum.

    The exp is ``expf.exp_f32``, which vectorizes.
    """
    seg = s[j0:j1]  # indexes from 0: a runtime j0 could be negative, and wraparound blocks vectorizing
    total = np.float32(0.0)
    for j in range(seg.shape[0]):
        seg[j] = exp_f32(max(seg[j] - shift, np.float32(-87.0)))  # below -87 exp underflows
        total += seg[j]
    return total


@njit(cache=True, fastmath=FASTMATH)
def _attend_tile(out, q, kv, table, ctx, seq_q0, nq, t0, t1, hk, scale, window, soft_cap):
    """Attend queries ``t0:t1`` (flat rows of one sequence starting at ``seq_q0``) for kv head ``hk``.

    Rows are (query, head-in-group) pairs, so each K/V block is read once for the whole tile.
    """
    head_dim = q.shape[2]
    group = q.shape[1] // kv.shape[2]
    block_size = kv.shape[3]
    rows = (t1 - t0) * group
    qt = np.empty((rows, head_dim), np.float32)
    acc = np.zeros((rows, head_dim), np.float32)
    row_max = np.full(rows, -np.inf, np.float32)
    row_sum = np.zeros(rows, np.float32)
    s = np.empty(block_size, np.float32)
    k_scratch = np.empty(block_size * head_dim, np.uint32)
    v_scratch = np.empty(block_size * head_dim, np.uint32)
    for i in range(t1 - t0):
        for g in range(group):
            for d in range(head_dim):
                qt[i * group + g, d] = q[t0 + i, hk * group + g, d]

    pos0 = ctx - nq + (t0 - seq_q0)  # position of the tile's first query
    pos1 = pos0 + (t1 - t0) - 1
    k_lo = 0 if window <= 0 else max(0, pos0 - window + 1)
    for bi in range(k_lo // block_size, pos1 // block_size + 1):
        blk = table[bi]
        kb = _block_f32(kv[0, blk, hk], k_scratch)
        vb = _block_f32(kv[1, blk, hk], v_scratch)
        base = bi * block_size
        for r in range(rows):
            pos = pos0 + r // group
            lo = 0 if window <= 0 else pos - window + 1
            j0 = max(lo - base, 0)
            j1 = min(pos + 1 - base, block_size)
            if j1 <= j0:
                continue
            m_new = row_max[r]
            for j in range(j0, j1):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += qt[r, d] * kb[j, d]
                x = dot * scale
                if soft_cap > 0:
                    x = soft_cap * np.tanh(x / soft_cap)
                s[j] = x
                m_new = max(m_new, x)
            if m_new > row_max[r]:
                corr = np.exp(row_max[r] - m_new)
                row_sum[r] *= corr
                for d in range(head_dim):
                    acc[r, d] *= corr
                row_max[r] = m_new
            total = row_sum[r] + _exp_shifted(s, j0, j1, m_new)
            for j in range(j0, j1):
                p = s[j]
                for d in range(head_dim):
                    acc[r, d] += p * vb[j, d]
            row_sum[r] = total

    for i in range(t1 - t0):
        for g in range(group):
            r = i * group + g
            inv = np.float32(1.0) / row_sum[r]
            for d in range(head_dim):
                acc[r, d] *= inv
            store_row(out[t0 + i, hk * group + g], acc[r])


@njit(cache=True, fastmath=FASTMATH)
def _decode_softmax(scores, group, n, soft_cap, maxes, sums):
    """In place over ``scores[g, :n]``: the soft cap (``soft_cap > 0``), then ``exp(s - max)``; each
    row's max and sum into ``maxes[g]``, ``sums[g]`` (unnormalized, as ``p @ V`` and
    ``_merge_partials`` want them)."""
    for g in range(group):
        row = scores[g]
        if soft_cap > 0:
            for j in range(n):
                row[j] = soft_cap * np.tanh(row[j] / soft_cap)
        maxes[g] = row_max(row, n)
    _exp_rows(scores, maxes, sums, group, n)


@njit(cache=True, inline="always")
def row_max(row, n):
    """``max(row[:n])`` (``n >= 1``) over four running maxima: LLVM vectorizes no float max reduction,
    and a single chain waits out the max's 4-cycle latency at every element."""
    m0 = m1 = m2 = m3 = row[0]
    j = 0
    while j + 4 <= n:
        m0, m1 = max(m0, row[j]), max(m1, row[j + 1])
        m2, m3 = max(m2, row[j + 2]), max(m3, row[j + 3])
        j += 4
    while j < n:
        m0 = max(m0, row[j])
        j += 1
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True, fastmath=FASTMATH)
def _exp_rows(scores, maxes, sums, group, n):
    """``scores[g, :n] = exp(scores[g, :n] - maxes[g])`` in place, their sums into ``sums[g]``."""
    for g in range(group):
        sums[g] = _exp_shifted(scores[g], 0, n, maxes[g])


@njit(cache=True, fastmath=FASTMATH)
def _decode_finish(out, acc, maxes, sums, partials, slot, t, hk, group):
    """A decode item's ``acc [group rows, D]``: into ``partials[slot]`` with its (max, sum) when the
    context was split (``slot >= 0``), else normalized into ``out``."""
    head_dim = out.shape[2]
    if slot >= 0:
        for g in range(group):
            partials[slot, g, 0] = maxes[g]
            partials[slot, g, 1] = sums[g]
            for d in range(head_dim):
                partials[slot, g, 2 + d] = acc[g, d]
        return
    for g in range(group):  # element by element: row views cost 32 one-block decodes 49 against 44 us
        inv = np.float32(1.0) / sums[g]
        h = hk * group + g
        for d in range(head_dim):
            out[t, h, d] = from_f32(out, acc[g, d] * inv)


@njit(cache=True, fastmath=FASTMATH)
def _attend_decode(out, q, kv, table, lo, hi, t, hk, scale, soft_cap, partials, slot):
    """One query row (a decode) for kv head ``hk`` over keys ``lo:hi``: all scores first, then one
    softmax, then ``p @ V``.

    With a single query per sequence there is nothing to tile, so the two-pass form beats the online
    softmax: no per-block rescaling, the group's query heads share every K and V row load, and the
    exponentials run as one long vectorized loop. A bf16 cache is widened element by element inside
    the dot products (no scratch copy: 5 % faster at 32 sequences). ``slot >= 0`` stores the
    unnormalized result and its (max, sum) in ``partials[slot]`` for ``_merge_partials`` (a long
    context split across threads).
    """
    head_dim = q.shape[2]
    group = q.shape[1] // kv.shape[2]
    block_size = kv.shape[3]
    n = hi - lo
    scores = np.empty((group, n), np.float32)
    maxes = np.empty(group, np.float32)
    sums = np.empty(group, np.float32)
    qt = np.empty((group, head_dim), np.float32)
    for g in range(group):
        for d in range(head_dim):
            qt[g, d] = q[t, hk * group + g, d] * scale
    last = (hi - 1) // block_size
    for bi in range(lo // block_size, last + 1):
        if bi < last:  # the next K block streams in while this one is scored
            prefetch_rows(kv[0, table[bi + 1], hk])
        prefetch_rows(kv[1, table[bi], hk])  # and V, for the p @ V pass
        kb = kv[0, table[bi], hk]  # widened element by element: no scratch pass
        base = bi * block_size
        j0, j1 = max(lo - base, 0), min(hi - base, block_size)
        for g in range(group):
            qg = qt[g]
            j = j0
            while j + 4 <= j1:  # four keys per pass: four independent sums to overlap
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for d in range(head_dim):
                    a0 += qg[d] * _f32(kb[j, d])
                    a1 += qg[d] * _f32(kb[j + 1, d])
                    a2 += qg[d] * _f32(kb[j + 2, d])
                    a3 += qg[d] * _f32(kb[j + 3, d])
                o = base + j - lo
                scores[g, o] = a0 * scale_of(kb, j, head_dim)
                scores[g, o + 1] = a1 * scale_of(kb, j + 1, head_dim)
                scores[g, o + 2] = a2 * scale_of(kb, j + 2, head_dim)
                scores[g, o + 3] = a3 * scale_of(kb, j + 3, head_dim)
                j += 4
            while j < j1:
                a = np.float32(0.0)
                for d in range(head_dim):
                    a += qg[d] * _f32(kb[j, d])
                scores[g, base + j - lo] = a * scale_of(kb, j, head_dim)
                j += 1
    _decode_softmax(scores, group, n, soft_cap, maxes, sums)
    acc = np.zeros((group, head_dim), np.float32)
    decode_pv(kv, table, lo, hi, hk, scores, acc)
    _decode_finish(out, acc, maxes, sums, partials, slot, t, hk, group)


@njit(cache=True, fastmath=FASTMATH)
def _merge_partials(out, q, items, partials, n_kv):
    """Combine the key-range parts of split decodes: rescale each part to the common max and sum."""
    group = q.shape[1] // n_kv
    head_dim = q.shape[2]
    row = np.empty(head_dim, np.float32)
    i = 0
    while i < items.shape[0]:
        if items[i, 6] < 0:
            i += 1
            continue
        j = i
        while j < items.shape[0] and items[j, 0] == items[i, 0] and items[j, 1] == items[i, 1] and (
                items[j, 2] == items[i, 2]):
            j += 1
        t, hk = items[i, 2], items[i, 1]
        for g in range(group):
            m = partials[items[i, 6], g, 0]
            for p in range(i + 1, j):
                m = max(m, partials[items[p, 6], g, 0])
            total = np.float32(0.0)
            row[:] = 0.0
            for p in range(i, j):
                part = partials[items[p, 6], g]
                w = np.float32(np.exp(part[0] - m))
                total += part[1] * w
                for d in range(head_dim):
                    row[d] += part[2 + d] * w
            inv = np.float32(1.0) / total
            for d in range(head_dim):
                row[d] *= inv
            store_row(out[t, hk * group + g], row)
        i = j


@njit(cache=True)
def _decode_range(ctx: int, window: int) -> tuple[int, int, int]:
    """A decode's first key (the sliding window's start), how many key-range items it splits into and
    their size: ``(ctx - lo) // DECODE_KEYS_PER_ITEM`` ranges (at least one) of equal size rounded up
    to whole 16-key tiles, the last one shorter (never empty). Equal ranges leave no short tail item,
    whose fixed cost (~1.5 us on the AMX kernel) made a 257-key context cost 1.25x a 256-key one at
    32 decodes."""
    lo = 0 if window <= 0 else max(0, ctx - window)
    n = ctx - lo
    parts = max(1, n // DECODE_KEYS_PER_ITEM)
    size = ((n + parts - 1) // parts + 15) // 16 * 16
    return lo, (n + size - 1) // size, size  # rounding up to tiles can leave one range fewer


@njit(cache=True)
def _plan(query_start_loc: np.ndarray, seq_lens: np.ndarray, n_kv: int, q_tile: int, window: int,
          group: int, head_dim: int, row_decodes: int = 1):
    """Work items and the order to deal them out in.

    An item is ``[sequence, kv head, first row, end row, first key, end key, partial slot, decode
    row]``. A prefill chunk splits into tiles of ``q_tile`` query rows (decode row -1); a decode whose
    context holds ``2 * DECODE_KEYS_PER_ITEM`` keys or more splits into key ranges (``_decode_range``;
    slot >= 0) merged afterwards, so one long sequence still keeps every thread busy. A sequence of up
    to ``row_decodes`` rows is that many decodes, each row over the keys up to its own. How a sequence
    splits depends only on its own length, never on the batch. The order is costliest first, so the
    snake-order deal in ``_run_items`` balances threads without dynamic scheduling. Returns
    ``(items, order, partials)``, the last with one ``[group, 2 + head_dim]`` slot per split item.
    """
    n_seqs = seq_lens.shape[0]
    n_items = 0
    for b in range(n_seqs):
        nq = query_start_loc[b + 1] - query_start_loc[b]
        if nq <= max(row_decodes, 1):
            for r in range(nq):
                n_items += n_kv * _decode_range(seq_lens[b] - r, window)[1]
        else:
            n_items += n_kv * ((nq + q_tile - 1) // q_tile)
    items = np.empty((n_items, 8), np.int64)
    cost = np.empty(n_items, np.int64)
    it = 0
    slots = 0
    for b in range(n_seqs):
        end = query_start_loc[b + 1]
        ctx = seq_lens[b]
        if end - query_start_loc[b] <= max(row_decodes, 1):
            for t in range(query_start_loc[b], end):
                keys = ctx - (end - 1 - t)  # the row's own and every key before it
                lo, parts, size = _decode_range(keys, window)
                for hk in range(n_kv):
                    for p in range(parts):
                        k0 = lo + p * size
                        items[it, 0] = b
                        items[it, 1] = hk
                        items[it, 2] = t
                        items[it, 3] = t + 1
                        items[it, 4] = k0
                        items[it, 5] = min(keys, k0 + size)
                        items[it, 6] = slots if parts > 1 else -1
                        items[it, 7] = t
                        slots += 1 if parts > 1 else 0
                        cost[it] = -(items[it, 5] - k0)
                        it += 1
            continue
        while end > query_start_loc[b]:
            start = max(end - q_tile, query_start_loc[b])
            reach = ctx - (query_start_loc[b + 1] - end)  # keys seen by the tile's last query
            for hk in range(n_kv):
                items[it, 0] = b
                items[it, 1] = hk
                items[it, 2] = start
                items[it, 3] = end
                items[it, 4] = 0
                items[it, 5] = reach
                items[it, 6] = -1
                items[it, 7] = -1
                cost[it] = -(end - start) * reach
                it += 1
            end = start
    partials = np.empty((slots, group, 2 + head_dim), np.float32)
    return items, np.argsort(cost, kind="mergesort"), partials


@njit(cache=True)
def dealt_items(order: np.ndarray, worker: int, n_workers: int, unit: int = 1) -> np.ndarray:
    """The items of ``order`` dealt to ``worker`` in snake order (0 1 .. P-1 P-1 .. 0 0 1 ..), ``unit``
    consecutive items at a time: with items sorted costliest first, every worker gets a similar share
    without dynamic scheduling."""
    mine = np.empty(order.shape[0] // n_workers + unit, np.int64)
    count = 0
    for i in range(order.shape[0]):
        lap, k = divmod(i // unit, n_workers)
        if (k if lap % 2 == 0 else n_workers - 1 - k) == worker:
            mine[count] = order[i]
            count += 1
    return mine[:count]


@njit(cache=True)
def heads_unit(n_items: int, n_kv: int, n_workers: int) -> int:
    """``dealt_items``' unit for a ``_plan`` order: a sequence's ``n_kv`` head items of one key range
    (or query tile) stand together in it, and one worker attending them back to back reads each block's
    K (and V) pieces, adjacent in the cache, as one run (32 decodes' attention 1.13-1.18x, BENCHMARKS.md
    round 37). Single items while there are fewer than four such groups a worker: with 2 units a
    worker (4 sequences on 2 threads) balance cost what locality gave, with 4 (8 sequences) 1.05x."""
    if n_kv > 1 and n_items % n_kv == 0 and n_items // n_kv >= 4 * n_workers:
        return n_kv
    return 1


@njit(cache=True, fastmath=FASTMATH)
def _run_items(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items,
               order, partials, worker, n_workers):
    """Run the items dealt to ``worker`` (``dealt_items``)."""
    scale32 = np.float32(scale)
    cap32 = np.float32(soft_cap)
    for item in dealt_items(order, worker, n_workers, heads_unit(order.shape[0], kv.shape[2], n_workers)):
        b = items[item, 0]
        seq_q0 = query_start_loc[b]
        nq = query_start_loc[b + 1] - seq_q0
        if items[item, 7] >= 0:
            _attend_decode(out, q, kv, block_tables[b], items[item, 4], items[item, 5], items[item, 7],
                           items[item, 1], scale32, cap32, partials, items[item, 6])
            continue
        _attend_tile(out, q, kv, block_tables[b], seq_lens[b], seq_q0, nq, items[item, 2],
                     items[item, 3], items[item, 1], scale32, window, cap32)


@njit(cache=True, parallel=True)
def paged_attention(out: np.ndarray, q: np.ndarray, kv: np.ndarray, query_start_loc: np.ndarray,
                    seq_lens: np.ndarray, block_tables: np.ndarray, scale: float, window: int,
                    soft_cap: float, q_tile: int, n_threads: int) -> None:
    """``out[T, H, D] = softmax(q k^T * scale, causal [, window] [, soft cap]) v`` over the paged cache;
    ``out`` is float32 or bf16 bits (uint16), rounded once from the float32 result.

    ``window <= 0`` and ``soft_cap <= 0`` switch those off; ``n_threads`` is Numba's thread count.
    """
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    n_workers = max(1, min(n_threads, order.shape[0]))
    for w in prange(n_workers):
        _run_items(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items,
                   order, partials, w, n_workers)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def paged_attention_serial(out: np.ndarray, q: np.ndarray, kv: np.ndarray, query_start_loc: np.ndarray,
                           seq_lens: np.ndarray, block_tables: np.ndarray, scale: float, window: int,
                           soft_cap: float, q_tile: int) -> None:
    """``paged_attention`` on the calling thread: for steps too small to repay waking a thread pool
    (a few microseconds when idle, a scheduler time slice when another process holds the cores)."""
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    _run_items(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items,
               order, partials, 0, 1)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def paged_attention_step(out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: np.ndarray,
                         slot_mapping: np.ndarray, query_start_loc: np.ndarray, seq_lens: np.ndarray,
                         block_tables: np.ndarray, scale: float, window: int, soft_cap: float,
                         q_tile: int, n_threads: int) -> None:
    """One layer's attention for one engine step: write ``k, v`` into their slots, then attend.

    A single Numba dispatch per layer keeps the Python overhead of a decode step low.
    ``n_threads == 1`` runs on the calling thread without touching the thread pool.
    """
    write_kv(kv, k, v, slot_mapping)
    attend(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads)


@njit(cache=True)
def attend(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads):
    """``paged_attention`` on ``n_threads`` threads, or on the calling thread alone when it is 1."""
    if n_threads > 1:
        paged_attention(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap,
                        q_tile, n_threads)
    else:
        paged_attention_serial(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window,
                               soft_cap, q_tile)


@njit(cache=True)
def rope_attention_step(out: np.ndarray, qkv: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray,
                        kv: np.ndarray, slot_mapping: np.ndarray, query_start_loc: np.ndarray,
                        seq_lens: np.ndarray, block_tables: np.ndarray, scale: float, window: int,
                        soft_cap: float, q_tile: int, n_threads: int) -> None:
    """A layer's whole attention from its fused projection rows ``qkv [T, (H + 2 Hkv) D]`` (float32 or
    bf16 bits, C-contiguous) in one dispatch: ``rope_neox_qk`` into float32 q and k, the cache
    writes, then ``paged_attention`` into ``out [T, H, D]``; the same numbers as the separate
    calls. Worth it for decode steps, where a dispatch costs about as much as the work."""
    q_rot, _ = rope_and_write(qkv, positions, cos_sin, kv, slot_mapping, out.shape[1])
    attend(out, q_rot, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads)


@njit(cache=True)
def prefetch_slots(kv, slot_mapping):
    """Ask for the cache lines that ``write_kv`` will write for ``slot_mapping`` (every kv head's K and
    V row of each slot). A decode step's new rows land in blocks no one has touched for a while, so
    the write missed to DRAM on the calling thread while the other one waited: asked for before a
    layer's qkv projection, they arrive while it multiplies."""
    n_blocks, n_k, block_size, row = kv.shape[1], kv.shape[2], kv.shape[3], kv.shape[4]
    flat_kv = flat(unmanaged(kv))
    step = CACHE_LINE // kv.itemsize
    for i in range(slot_mapping.shape[0]):
        slot = slot_mapping[i]
        if slot < 0:
            continue
        blk, off = slot // block_size, slot % block_size
        for s in range(2):
            for h in range(n_k):
                at = (((s * n_blocks + blk) * n_k + h) * block_size + off) * row
                for e in range(at, at + row, step):
                    prefetch(flat_kv, e)
                if row % step:  # a row that ends inside a line the loop did not start in (int8: 68 bytes)
                    prefetch(flat_kv, at + row - 1)


@njit(cache=True)
def rope_and_write(qkv, positions, cos_sin, kv, slot_mapping, n_q):
    """The fused steps' first half: q and k of ``qkv`` rotated into new float32 arrays (returned),
    k and v written to their cache slots (v straight from the projection rows)."""
    n_k = kv.shape[2]
    dim = qkv.shape[1] // (n_q + 2 * n_k)
    q_rot = np.empty((qkv.shape[0], n_q, dim), np.float32)
    k_rot = np.empty((qkv.shape[0], n_k, dim), np.float32)
    rope_neox_qk(qkv, positions, cos_sin, q_rot, k_rot)
    write_kv(kv, k_rot, qkv[:, (n_q + n_k) * dim:], slot_mapping)
    return q_rot, k_rot
