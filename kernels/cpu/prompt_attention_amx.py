"""Causal attention for prompt chunks on AMX tiles, over a paged bf16 KV cache with head size 64.

torch's flash attention spends ~0.6 ms a call on this model's prompts (9 heads of 64, ~150 rows),
about 20 GFLOP/s: in a batch of 32 such prompts that is a third of the prefill. Here a work item
(sequence, kv head, up to ``ROW_CHUNK`` query rows) gathers its keys once for the group's query heads
and rows, then takes 16 query rows of one head at a time through two tile products:

- ``S[16 rows, 16 keys] = Q[16, 64] @ K^T[64, 16]``: q rounded to bf16 after scaling (as the flash
  attention path takes it) in two A tiles, K^T gathered into VNNI B tiles (dim pairs by key);
- a row's softmax in float32 over the keys it may see, the probabilities rounded to bf16 (P);
- ``O[16 rows, 64] = P[16, keys] @ V[keys, 64]``, 32 keys a product, V's rows interleaved in key
  pairs (VNNI) into four B tiles per 32 keys; float32 sums, normalized, rounded once to bf16.

The arithmetic is ``prompt_attention_dp``'s (AVX512-BF16): bf16 q and p, float32 softmax and sums.
An int8 cache (``kv_int8``) is read through the same tiles: an item first dequantizes the K and V
rows it needs (those its thread has not already, for the same sequence and head), rounded to bf16 (as
torch's flash attention would take them), into a scratch laid out as a one-block bf16 cache.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from edgellm.kernels.cpu.amx import (
    element_ptr,
    tile_config,
    tile_dp_bf16,
    tile_load,
    tile_release,
    tile_store,
    tile_zero,
)
from edgellm.kernels.cpu.attention_amx import HEAD_DIM
from edgellm.kernels.cpu.bf16 import round_bits
from edgellm.kernels.cpu.int4_amx import store_bf16_32
from edgellm.kernels.cpu.kv_int8 import SCALE_BYTES, row_scale
from edgellm.kernels.cpu.paged_attention import FASTMATH, dealt_items
from edgellm.kernels.cpu.prompt_attention_dp import _plan
from edgellm.kernels.cpu.softmax16 import softmax_row
from edgellm.kernels.cpu.vec16 import transpose16

ROWS = 16  # query rows per tile product
KEY_TILE = 16  # keys per scores tile
KEY_CHUNK = 32  # keys per output product (one P tile)
K_TILE_WORDS = 2 * 16 * 16  # uint32 words of one key tile's two K^T B tiles (dims 0-31, 32-63)
V_CHUNK_HALVES = 4 * 16 * 32  # uint16 of one 32-key chunk's four V B tiles (16 dims each)


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether a cache ``kv [2, blocks, Hkv, block_size, D]`` (uint16 = bf16 bits, or int8 rows of
    ``D + 4``) fits this kernel (the caller checks the CPU: ``amx.request_amx``)."""
    if kv.dtype == np.int8:
        return kv.shape[4] == HEAD_DIM + SCALE_BYTES and 1 <= group <= 16
    return kv.dtype == np.uint16 and kv.shape[4] == HEAD_DIM and 1 <= group <= 16


def _bf16_source(kv, kv32, table, hk, keys, deq, deq32, table0, seq, held):
    """``(cache, its uint32 view, block table, kv head)`` for ``_gather`` to read keys ``0:keys``
    of kv head ``hk`` from: a bf16 cache itself, or an int8 cache's rows dequantized into ``deq``
    (``[2, 1, Hkv, >= keys, 64]`` uint16, ``deq32`` its uint32 view; ``table0 = [0]``). ``held[:, hk]``
    is the sequence whose rows ``deq`` holds for that head and how many: a later item of the same
    sequence and head dequantizes only the keys it sees beyond them (a 512-token prompt's 8 items
    otherwise dequantize its keys ~4.5 times over)."""
    raise NotImplementedError("only callable from Numba code")


@overload(_bf16_source, inline="always")
def _bf16_source_impl(kv, kv32, table, hk, keys, deq, deq32, table0, seq, held):
    if kv.dtype == types.int8:
        def dequantized(kv, kv32, table, hk, keys, deq, deq32, table0, seq, held):
            if held[0, hk] != seq:
                held[0, hk], held[1, hk] = seq, 0
            block_size = kv.shape[3]
            for plane in range(2):
                for j in range(held[1, hk], keys):
                    row = kv[plane, table[j // block_size], hk, j % block_size]
                    s = row_scale(row, HEAD_DIM)
                    dst = deq[plane, 0, hk, j]
                    for d in range(HEAD_DIM):
                        dst[d] = round_bits(np.float32(row[d]) * s)
            held[1, hk] = max(held[1, hk], keys)
            return deq, deq32, table0, hk
        return dequantized
    return lambda kv, kv32, table, hk, keys, deq, deq32, table0, seq, held: (kv, kv32, table, hk)


@intrinsic
def _vnni_rows(typingctx, a, a_index, b, b_index, dst, dst_index):
    """Interleave two 64-element bf16 rows ``a`` (key 2r) and ``b`` (key 2r + 1) into the VNNI row
    ``r`` of four B tiles: ``dst.flat[dst_index + 512 c + 2 n + e] = (a, b)[e][16 c + n]``."""
    ok = all(isinstance(t, types.Array) and t.dtype == types.uint16 for t in (a, b, dst))
    if not (ok and all(isinstance(t, types.Integer) for t in (a_index, b_index, dst_index))):
        return None

    def codegen(context, builder, sig, args):
        v64 = ir.VectorType(ir.IntType(16), HEAD_DIM)
        ra = builder.load(element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v64), align=2)
        rb = builder.load(element_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], v64), align=2)
        for c in range(HEAD_DIM // 16):
            mask = ir.Constant(ir.VectorType(ir.IntType(32), 32),
                               [16 * c + i // 2 + (HEAD_DIM if i % 2 else 0) for i in range(32)])
            row = builder.shuffle_vector(ra, rb, mask)
            builder.store(row, element_ptr(context, builder, sig.args[4], args[4], args[5], sig.args[5], row.type,
                                           512 * c), align=2)
        return context.get_dummy_value()

    return types.void(a, a_index, b, b_index, dst, dst_index), codegen


@intrinsic
def _k_tile(typingctx, src, rows, dst, dst_index):
    """One key tile's two K^T B tiles: ``dst.flat[dst_index + 256 h + 16 p + n] = src.flat[rows[n] + 16 h
    + p]`` for 16 keys ``n`` (their rows at the offsets ``rows``, uint32 dim pairs) and 32 dim pairs
    ``16 h + p``: a 16 x 16 transpose per half (``vec16.transpose16``)."""
    if not (isinstance(src, types.Array) and src.dtype == types.uint32 and isinstance(dst, types.Array)
            and dst.dtype == types.uint32 and isinstance(rows, types.Array) and rows.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(32), 16)
        rows_ty, rows_val = sig.args[1], args[1]
        for h in range(2):
            vecs = []
            for n in range(16):
                at = builder.load(element_ptr(context, builder, rows_ty, rows_val, context.get_constant(types.intp, n),
                                              types.intp, ir.IntType(64)))
                vecs.append(builder.load(element_ptr(context, builder, sig.args[0], args[0], at, types.int64, v16,
                                                     16 * h), align=4))
            vecs = transpose16(builder, vecs)
            for p in range(16):
                builder.store(vecs[p], element_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], v16,
                                                   256 * h + 16 * p), align=4)
        return context.get_dummy_value()

    return types.void(src, rows, dst, dst_index), codegen


@njit(cache=True)
def _gather(kv, kv32, table, hk, keys, kt, vt, k_rows, zero_row):
    """Keys ``0:keys`` of kv head ``hk`` as B tiles: ``kt`` (uint32) holds key tile ``j // 16``'s
    K^T at ``K_TILE_WORDS * (j // 16)``, dim pair ``p`` of key ``j`` at ``+ 256 (p // 16) + 16 (p %
    16) + j % 16``; ``vt`` (uint16) holds 32-key chunk ``c``'s V in key pairs at ``V_CHUNK_HALVES *
    c`` (``_vnni_rows``' layout). V rows past ``keys`` up to the chunk's end are zeros (p is zero there,
    and 0 times a stale value could be NaN)."""
    block_size = kv.shape[3]
    v_off = kv.shape[1] * kv.shape[2] * block_size * HEAD_DIM  # kv[1] starts here
    n_chunks = (keys + KEY_CHUNK - 1) // KEY_CHUNK
    blk, off = 0, 0  # key j's block index and offset in it, stepped (no divisions)
    prev = 0  # key j - 1's row
    for j in range(keys):
        src = ((table[blk] * kv.shape[2] + hk) * block_size + off) * HEAD_DIM
        k_rows[j % KEY_TILE] = src // 2
        if j % KEY_TILE == KEY_TILE - 1:
            _k_tile(kv32, k_rows, kt, K_TILE_WORDS * (j // KEY_TILE))
        if j % 2 == 1:
            _vnni_rows(kv, v_off + prev, kv, v_off + src, vt, V_CHUNK_HALVES * (j // KEY_CHUNK) + 32 * (j % KEY_CHUNK // 2))
        prev = src
        off += 1
        if off == block_size:
            blk, off = blk + 1, 0
    if keys % KEY_TILE:  # the last tile's keys past ``keys`` repeat its last key (their scores are masked)
        for n in range(keys % KEY_TILE, KEY_TILE):
            k_rows[n] = k_rows[keys % KEY_TILE - 1]
        _k_tile(kv32, k_rows, kt, K_TILE_WORDS * (keys // KEY_TILE))
    if keys % 2 == 1:
        j = keys - 1
        _vnni_rows(kv, v_off + prev, zero_row, 0, vt, V_CHUNK_HALVES * (j // KEY_CHUNK) + 32 * (j % KEY_CHUNK // 2))
    for r in range((keys + 1) // 2, n_chunks * KEY_CHUNK // 2):
        _vnni_rows(zero_row, 0, zero_row, 0, vt, V_CHUNK_HALVES * (r // 16) + 32 * (r % 16))


@njit(cache=True, fastmath=FASTMATH)
def _attend_item(out, q_flat, kv, kv32, table, q0, n, ctx, hk, r0, r1, scale, kt, vt, qrow, qa, scores, pa,
                 obuf, inv, k_rows, zero_row, deq, deq32, table0, seq, held):
    """Rows ``r0:r1`` of one sequence's chunk (``n`` rows from ``q0``, ``ctx`` keys with the chunk's
    own) for kv head ``hk``'s query heads; the tiles are configured."""
    n_heads = out.shape[1]
    group = n_heads // kv.shape[2]
    keys = ctx - n + r1  # what the item's last row sees
    src, src32, src_table, src_hk = _bf16_source(kv, kv32, table, hk, keys, deq, deq32, table0, seq, held)
    _gather(src, src32, src_table, src_hk, keys, kt, vt, k_rows, zero_row)
    out_flat = out.reshape(-1)
    for t0 in range(r0, r1, ROWS):  # the group's heads of a row are adjacent in q and out
        rows = min(ROWS, r1 - t0)
        for g in range(group):
            h = hk * group + g
            for r in range(rows):
                base = ((q0 + t0 + r) * n_heads + h) * HEAD_DIM
                for d in range(HEAD_DIM):
                    qrow[d] = q_flat[base + d] * scale
                store_bf16_32(qrow, 0, qa, r * HEAD_DIM)
                store_bf16_32(qrow, 32, qa, r * HEAD_DIM + 32)
            seen = ctx - n + t0 + rows  # keys the block's last row sees
            n_tiles = (seen + KEY_TILE - 1) // KEY_TILE
            width = (seen + KEY_CHUNK - 1) // KEY_CHUNK * KEY_CHUNK  # the row stride of scores and pa
            # scores: Q in tiles 1, 2; key tiles alternate between (C 0, B 3) and (C 4, B 5)
            tile_load(1, qa, 0, 2 * HEAD_DIM)
            tile_load(2, qa, 32, 2 * HEAD_DIM)
            for i in range(0, n_tiles, 2):
                tile_zero(0)
                tile_load(3, kt, K_TILE_WORDS * i, 64)
                tile_dp_bf16(0, 1, 3)
                tile_load(3, kt, K_TILE_WORDS * i + 256, 64)
                tile_dp_bf16(0, 2, 3)
                if i + 1 < n_tiles:
                    tile_zero(4)
                    tile_load(5, kt, K_TILE_WORDS * (i + 1), 64)
                    tile_dp_bf16(4, 1, 5)
                    tile_load(5, kt, K_TILE_WORDS * (i + 1) + 256, 64)
                    tile_dp_bf16(4, 2, 5)
                    tile_store(4, scores, KEY_TILE * (i + 1), 4 * width)
                tile_store(0, scores, KEY_TILE * i, 4 * width)
            # each row's softmax over the keys it sees; zeros past them up to the chunk's end
            for r in range(rows):
                limit = ctx - n + t0 + r + 1
                row = r * width
                total = softmax_row(scores, row, limit, width)
                inv[r] = np.float32(1.0) / total
                for c in range(0, width, KEY_CHUNK):
                    store_bf16_32(scores, row + c, pa, row + c)
            # p @ V: four C tiles of 16 dims; P in tile 0, V's B tiles alternate between 1 and 2
            tile_zero(4)
            tile_zero(5)
            tile_zero(6)
            tile_zero(7)
            for c in range(width // KEY_CHUNK):
                tile_load(0, pa, c * KEY_CHUNK, 2 * width)
                v0 = V_CHUNK_HALVES * c
                tile_load(1, vt, v0, 64)
                tile_dp_bf16(4, 0, 1)
                tile_load(2, vt, v0 + 512, 64)
                tile_dp_bf16(5, 0, 2)
                tile_load(1, vt, v0 + 1024, 64)
                tile_dp_bf16(6, 0, 1)
                tile_load(2, vt, v0 + 1536, 64)
                tile_dp_bf16(7, 0, 2)
            tile_store(4, obuf, 0, 4 * HEAD_DIM)
            tile_store(5, obuf, 16, 4 * HEAD_DIM)
            tile_store(6, obuf, 32, 4 * HEAD_DIM)
            tile_store(7, obuf, 48, 4 * HEAD_DIM)
            for r in range(rows):
                o = r * HEAD_DIM
                for d in range(HEAD_DIM):
                    obuf[o + d] *= inv[r]
                dst = ((q0 + t0 + r) * n_heads + h) * HEAD_DIM
                store_bf16_32(obuf, o, out_flat, dst)
                store_bf16_32(obuf, o + 32, out_flat, dst + 32)


@njit(cache=True)
def prompt_width(lens, s0, s1):
    """Score columns for sequences ``s0:s1``: their longest context rounded up to a whole P tile."""
    max_keys = 0
    for s in range(s0, s1):
        max_keys = max(max_keys, lens[s])
    return (max_keys + KEY_CHUNK - 1) // KEY_CHUNK * KEY_CHUNK


@njit(cache=True)
def prompt_scratch(kv, width):
    """One worker's flat scratch for ``attend_prompt_items`` over contexts of up to ``width`` keys
    (``prompt_width``), made once (each view or reshape costs Numba 35-80 ns)."""
    int8 = kv.itemsize == 1
    deq = np.empty((2, 1, kv.shape[2] if int8 else 1, width if int8 else 2, HEAD_DIM), np.uint16)  # int8 only
    return (np.empty(width // KEY_TILE * K_TILE_WORDS, np.uint32), np.empty(width // KEY_CHUNK * V_CHUNK_HALVES, np.uint16),
            np.empty(HEAD_DIM, np.float32), np.zeros(ROWS * HEAD_DIM, np.uint16), np.empty(ROWS * width, np.float32),
            np.zeros(ROWS * width, np.uint16), np.empty(ROWS * HEAD_DIM, np.float32), np.empty(ROWS, np.float32),
            np.empty(KEY_TILE, np.int64), np.zeros(HEAD_DIM, np.uint16), deq, deq.reshape(-1).view(np.uint32),
            np.zeros(1, np.int32), np.full((2, kv.shape[2]), -1, np.int64))


@njit(cache=True)
def attend_prompt_items(out, q, kv, starts, lens, block_tables, scale, items, order, part, parts, scratch, cfg):
    """The items of ``order`` (``prompt_attention_dp._plan``'s) dealt to ``part`` of ``parts``, on
    tiles configured here with ``cfg``; ``scratch`` from ``prompt_scratch``. ``decode_step_spin`` runs
    them as part of a step's attention phase, ``prompt_attention_amx`` one part a thread."""
    kt, vt, qrow, qa, scores, pa, obuf, inv, k_rows, zero_row, deq, deq32, table0, held = scratch
    held[:] = -1  # a new call may be another layer's cache: nothing dequantized is reused
    kv32 = kv.reshape(-1).view(np.uint32)
    q_flat = q.reshape(-1)
    s32 = np.float32(scale)
    mine = dealt_items(order, part, parts)
    if mine.shape[0]:
        tile_config(cfg)
        for i in range(mine.shape[0]):
            s, hk, r0, r1 = items[mine[i], 0], items[mine[i], 1], items[mine[i], 2], items[mine[i], 3]
            _attend_item(out, q_flat, kv, kv32, block_tables[s], starts[s], starts[s + 1] - starts[s], lens[s],
                         hk, r0, r1, s32, kt, vt, qrow, qa, scores, pa, obuf, inv, k_rows, zero_row, deq,
                         deq32, table0, s, held)
        tile_release()


@njit(cache=True, parallel=True)
def prompt_attention_amx(out, q, kv, starts, lens, block_tables, s0, s1, scale, cfg, n_threads):
    """Causal attention of prompt chunks ``s0:s1`` (rows ``starts[s]:starts[s + 1]`` of ``q [T, H, D]``
    float32, their K/V already in the cache ``kv`` at positions up to ``lens[s]``) into ``out [T, H,
    D]`` (bf16 bits), ``cfg`` the tile configuration (``amx.make_config``)."""
    items, order = _plan(starts, lens, s0, s1, kv.shape[2])
    workers = max(1, min(n_threads, order.shape[0]))
    width = prompt_width(lens, s0, s1)
    for w in prange(workers):
        attend_prompt_items(out, q, kv, starts, lens, block_tables, scale, items, order, w, workers,
                            prompt_scratch(kv, width), cfg)
