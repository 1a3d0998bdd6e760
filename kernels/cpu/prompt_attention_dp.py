"""Causal attention for prompt chunks on AVX512-BF16 (``vdpbf16ps``), over a paged bf16 KV cache.

torch's CPU flash attention reaches ~50 GFLOP/s on this model's shapes (9 heads of 64, a few hundred
rows, 2 threads), a third of a 512-token prefill. Here a chunk is two register-blocked products
(``dpbf16._dot_block``: 8 rows x 32 columns, 16 accumulators):

- a work item gathers its kv head's keys from their blocks into ``K^T`` bf16 pairs ``[D/2, ctx]``
  and its values into key pairs ``[ctx/2, D]``, shared by the group's query heads and the item's
  rows (a 512-token prompt's attention on one Zen 5 thread: 17 % of its time in the gather, key by
  key; a bf16 cache's blocks are now copied a block at a time as 32-bit pairs, ``_gather_bf16``);
- ``S = q K^T`` for 8 query rows at a time (q rounded to bf16 after scaling, as the flash attention
  path took it), float32 scores; a row's softmax in float32 over the keys it may see, in 16-lane
  vectors (``softmax16.softmax_row``: a third of the time LLVM's own loops took);
- ``O = P V`` with ``P`` rounded to bf16 (float32 sums), normalized, rounded once to bf16.

Work items are (sequence, kv head, 64-row chunk), costliest first, dealt to the threads in snake order.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from edgellm.kernels.cpu.bf16 import bf16_bits, round_bits
from edgellm.kernels.cpu.dpbf16 import BLOCK_ROWS, _dot_block
from edgellm.kernels.cpu.int4_amx import store_bf16_32
from edgellm.kernels.cpu.kv_int8 import SCALE_BYTES, scale_of
from edgellm.kernels.cpu.paged_attention import FASTMATH, dealt_items
from edgellm.kernels.cpu.softmax16 import softmax_row
from edgellm.kernels.cpu.unmanaged import keep_alive, unmanaged

ROW_CHUNK = 64  # query rows per work item
KEYS = 32  # score columns per _dot_block call


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether a cache ``kv [2, blocks, Hkv, block_size, D]`` (uint16 = bf16 bits; int8 rows of ``D + 4``,
    dequantized to bf16 as they are gathered) fits this kernel (the caller checks the CPU:
    ``dpbf16.supported``)."""
    dim = kv.shape[4] - (SCALE_BYTES if kv.dtype == np.int8 else 0)
    return kv.dtype in (np.uint16, np.int8) and dim in (64, 128) and kv.shape[3] % 2 == 0 and 1 <= group <= 16


@njit(cache=True)
def _plan(starts, lens, s0, s1, n_kv):
    """Items ``(seq, hk, row0, row1)`` for sequences ``s0:s1`` and their order, costliest first."""
    count = 0
    for s in range(s0, s1):
        count += n_kv * ((starts[s + 1] - starts[s] + ROW_CHUNK - 1) // ROW_CHUNK)
    items = np.empty((count, 4), np.int64)
    cost = np.empty(count, np.int64)
    i = 0
    for s in range(s0, s1):
        n = starts[s + 1] - starts[s]
        for hk in range(n_kv):
            for r0 in range(0, n, ROW_CHUNK):
                r1 = min(n, r0 + ROW_CHUNK)
                items[i, 0], items[i, 1], items[i, 2], items[i, 3] = s, hk, r0, r1
                cost[i] = -(r1 - r0) * (lens[s] - n + r1)  # rows x keys the last row sees
                i += 1
    return items, np.argsort(cost, kind="mergesort")


def _gather_kv(kv, table, hk, keys, kt, vp):
    """``kt [D/2, width]``: K^T as bf16 pairs (column j = key j's dims 2p, 2p + 1); ``vp [width/2,
    D]``: V as key pairs (row i = keys 2i, 2i + 1 of each dim); keys past ``keys`` are zero. A bf16
    cache's K rows are already pairs: ``_gather_bf16`` copies them as 32-bit words, a block at a time."""
    raise NotImplementedError("only callable from Numba code")


@overload(_gather_kv)
def _gather_kv_impl(kv, table, hk, keys, kt, vp):
    if kv.dtype == types.uint16:
        return lambda kv, table, hk, keys, kt, vp: _gather_bf16(kv, table, hk, keys, kt, vp)
    return lambda kv, table, hk, keys, kt, vp: _gather_scaled(kv, table, hk, keys, kt, vp)


@njit(cache=True)
def _gather_bf16(kv, table, hk, keys, kt, vp):
    """``_gather_kv`` for a bf16 cache: each block's K rows viewed as pairs (one 32-bit word each) and
    its V rows interleaved two by two, one view a block instead of two a key (prompts of 512-1,024
    tokens: their attention 1.08-1.16x; chat-length ones gain nothing, BENCHMARKS.md round 49)."""
    block_size, dim = kv.shape[3], vp.shape[1]
    half = dim // 2
    width = kt.shape[1]
    for b in range((keys + block_size - 1) // block_size):
        j0 = b * block_size
        n = min(block_size, keys - j0)
        k_pairs = kv[0, table[b], hk].reshape(-1).view(np.uint32)  # [block_size, D/2] flat
        for p in range(half):
            for jj in range(n):
                kt[p, j0 + jj] = k_pairs[jj * half + p]
        v = kv[1, table[b], hk]
        for i in range(n // 2):  # block_size is even: pairs never straddle blocks
            for d in range(dim):
                vp[j0 // 2 + i, d] = np.uint32(v[2 * i, d]) | (np.uint32(v[2 * i + 1, d]) << np.uint32(16))
        if n % 2:
            for d in range(dim):
                vp[(j0 + n - 1) // 2, d] = np.uint32(v[n - 1, d])
    for j in range(keys, width):
        for p in range(half):
            kt[p, j] = 0
    for i in range((keys + 1) // 2, width // 2):
        for d in range(dim):
            vp[i, d] = 0


@njit(cache=True, fastmath=FASTMATH)
def _gather_scaled(kv, table, hk, keys, kt, vp):
    """``_gather_kv`` for an int8 cache, each element times its row's scale rounded to bf16."""
    block_size, dim = kv.shape[3], vp.shape[1]
    half = dim // 2
    width = kt.shape[1]
    for j in range(keys):
        rows = kv[0, table[j // block_size], hk]
        s = scale_of(rows, j % block_size, dim)
        blk = rows[j % block_size]
        for p in range(half):
            kt[p, j] = np.uint32(bf16_bits(blk[2 * p], s)) | (np.uint32(bf16_bits(blk[2 * p + 1], s)) << np.uint32(16))
    for j in range(keys, width):
        for p in range(half):
            kt[p, j] = 0
    for i in range(width // 2):
        j = 2 * i
        if j + 1 < keys:
            rows0, rows1 = kv[1, table[j // block_size], hk], kv[1, table[(j + 1) // block_size], hk]
            s0, s1 = scale_of(rows0, j % block_size, dim), scale_of(rows1, (j + 1) % block_size, dim)
            v0, v1 = rows0[j % block_size], rows1[(j + 1) % block_size]
            for d in range(dim):
                vp[i, d] = np.uint32(bf16_bits(v0[d], s0)) | (np.uint32(bf16_bits(v1[d], s1)) << np.uint32(16))
        elif j < keys:
            rows0 = kv[1, table[j // block_size], hk]
            s0 = scale_of(rows0, j % block_size, dim)
            v0 = rows0[j % block_size]
            for d in range(dim):
                vp[i, d] = np.uint32(bf16_bits(v0[d], s0))
        else:
            for d in range(dim):
                vp[i, d] = 0


@njit(cache=True, fastmath=FASTMATH)
def _attend_chunk(out, q, kv, table, q0, n, ctx, hk, r0, r1, scale, qa, scores, pa, cbuf, inv):
    """Rows ``r0:r1`` of one sequence's chunk (``n`` rows from ``q0``, ``ctx`` keys with the chunk's
    own) for kv head ``hk``'s query heads."""
    dim = q.shape[2]
    half = dim // 2
    group = q.shape[1] // kv.shape[2]
    keys = ctx - n + r1  # what the chunk's last row sees
    width = (keys + KEYS - 1) // KEYS * KEYS
    n_heads = q.shape[1]
    width_s = scores.shape[1]  # = 2 * pa.shape[1]: row r of both starts at r * width_s in bf16 units
    scores_flat, cbuf_flat, out_flat = scores.reshape(-1), cbuf.reshape(-1), out.reshape(-1)
    pa_flat = pa.reshape(-1).view(np.uint16)  # the probabilities' bf16, pairs in order
    kt_w = np.empty((half, width), np.uint32)
    vp_w = np.empty((width // 2, dim), np.uint32)
    _gather_kv(kv, table, hk, keys, kt_w, vp_w)
    s32 = np.float32(scale)
    for g in range(group):
        h = hk * group + g
        for t0 in range(r0, r1, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, r1 - t0)
            for r in range(rows):
                row = q[q0 + t0 + r, h]
                for p in range(half):
                    lo = round_bits(row[2 * p] * s32)
                    hi = round_bits(row[2 * p + 1] * s32)
                    qa[r, p] = np.uint32(lo) | (np.uint32(hi) << np.uint32(16))
            seen = ctx - n + t0 + rows  # keys the tile's last row sees
            cols = (seen + KEYS - 1) // KEYS * KEYS
            for c0 in range(0, cols, KEYS):
                _dot_block(qa, 0, half, rows, kt_w, c0, width, 2, half, cbuf)
                for r in range(rows):
                    for j in range(KEYS):
                        scores[r, c0 + j] = cbuf[r, j]
            for r in range(rows):  # exp(s - max) up to the row's last key, zeros to ``cols``
                inv[r] = np.float32(1.0) / softmax_row(scores_flat, r * width_s, ctx - n + t0 + r + 1, cols)
                for c in range(0, cols, 32):  # the row in bf16 is its key pairs, in order
                    store_bf16_32(scores_flat, r * width_s + c, pa_flat, r * width_s + c)
            for d0 in range(0, dim, KEYS):
                _dot_block(pa, 0, pa.shape[1], rows, vp_w, d0, dim, 2, cols // 2, cbuf)
                for r in range(rows):
                    for j in range(KEYS):
                        cbuf[r, j] *= inv[r]
                    store_bf16_32(cbuf_flat, r * KEYS, out_flat, ((q0 + t0 + r) * n_heads + h) * dim + d0)


@njit(cache=True, parallel=True)
def prompt_attention_dp(out, q, kv, starts, lens, block_tables, s0, s1, scale, n_threads):
    """Causal attention of prompt chunks ``s0:s1`` (rows ``starts[s]:starts[s + 1]`` of ``q [T, H, D]``
    float32, their K/V already in the cache ``kv`` at positions up to ``lens[s]``) into ``out [T, H,
    D]`` (bf16 bits)."""
    items, order = _plan(starts, lens, s0, s1, kv.shape[2])
    workers = max(1, min(n_threads, order.shape[0]))
    max_keys = 0
    for s in range(s0, s1):
        max_keys = max(max_keys, lens[s])
    width = (max_keys + KEYS - 1) // KEYS * KEYS
    for w in prange(workers):
        _run_items(out, q, kv, starts, lens, block_tables, items, dealt_items(order, w, workers), scale, width)


@njit(cache=True)
def _run_items(out, q, kv, starts, lens, block_tables, items, mine, scale, width):
    """One worker's items, on views that count no references (``unmanaged``): gathering a key took
    two views of the shared cache, and the two threads' counts on it bounced between their cores."""
    out, q, kv, starts, lens = unmanaged(out), unmanaged(q), unmanaged(kv), unmanaged(starts), unmanaged(lens)
    block_tables, items = unmanaged(block_tables), unmanaged(items)
    dim = q.shape[2]
    qa_own = np.empty((BLOCK_ROWS, dim // 2), np.uint32)
    pa_own = np.empty((BLOCK_ROWS, width // 2), np.uint32)
    f32_own = np.empty(BLOCK_ROWS * (width + KEYS + 1), np.float32)
    qa, pa, f32 = unmanaged(qa_own), unmanaged(pa_own), unmanaged(f32_own)
    scores = f32[:BLOCK_ROWS * width].reshape(BLOCK_ROWS, width)
    cbuf = f32[BLOCK_ROWS * width:BLOCK_ROWS * (width + KEYS)].reshape(BLOCK_ROWS, KEYS)
    inv = f32[BLOCK_ROWS * (width + KEYS):]  # each row's 1 / sum of probabilities
    for i in range(mine.shape[0]):
        s, hk, r0, r1 = items[mine[i], 0], items[mine[i], 1], items[mine[i], 2], items[mine[i], 3]
        _attend_chunk(out, q, kv, block_tables[s], starts[s], starts[s + 1] - starts[s], lens[s], hk, r0, r1,
                      scale, qa, scores, pa, cbuf, inv)
    keep_alive(qa_own)
    keep_alive(pa_own)
    keep_alive(f32_own)
