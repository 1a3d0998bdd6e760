"""Decode attention on AMX tiles, for a bf16 KV cache with head size 64 and 16-key blocks.

The AVX-512 decode kernel (``paged_attention._attend_decode``) spends most of its time in the q.k
dot products (a horizontal sum per key and head) and in widening bf16 K/V element by element. On
AMX both products are tile multiplies:

- scores: ``C[16 keys, heads] = K_block[16 keys, 32 dims] @ Q^T[32 dims, heads]``, K straight from
  the cache (its rows are the A tile's rows), Q transposed once per work item into VNNI pairs;

Tiles multiply bf16, so q is split into ``hi = bf16(q)`` and ``lo = bf16(q - hi)`` as two columns of
the tile: ``hi + lo`` carries 16 bits of mantissa, the products are exact and accumulate in float32.
The softmax is the AVX-512 kernel's, and ``p @ V`` is ``decode_pv``'s: float32 p, the group's
accumulators in registers, each V row widened once. (``p @ V`` on tiles, with p split into hi and lo
and V's rows interleaved into VNNI pairs per 32 keys, cost more than this: a 32-stream decode step
ran 4-5 % faster without it.) Prompt tiles and other cache shapes stay on the AVX-512 kernels.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from edgellm.kernels.cpu.amx import (
    cvt_ne2ps2bf16,
    element_ptr,
    tile_config,
    tile_dp_bf16,
    tile_load,
    tile_release,
    tile_store,
    tile_zero,
)
from edgellm.kernels.cpu.attention_amx_int8 import attend_decodes_amx_int8
from edgellm.kernels.cpu.attention_amx_int8 import supports as supports_int8
from edgellm.kernels.cpu.decode_pv import decode_pv
from edgellm.kernels.cpu.decode_tiles import (
    SC_TILES,
    decode_item,
    last_scores,
    prefetch_tiles,
    ring_scores,
    tile_row,
)
from edgellm.kernels.cpu.paged_attention import (
    DECODE_MAX_KEYS,
    _attend_tile,
    _decode_finish,
    _decode_softmax,
    _exp_rows,
    _merge_partials,
    _plan,
    dealt_items,
    heads_unit,
    rope_and_write,
    write_kv,
)

HEAD_DIM = 64
KEY_TILE = 16  # keys per scores tile (one A tile of K rows)
MAX_GROUP = 8  # query heads per kv head: hi and lo of each fill at most 16 tile columns


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether a cache ``kv [2, blocks, Hkv, block_size, D]`` (uint16 = bf16 bits) and a GQA group
    size take this kernel; int8 caches go to ``attention_amx_int8`` through the same entry points."""
    if kv.dtype == np.int8:
        return supports_int8(kv, group)
    return (kv.dtype == np.uint16 and kv.shape[4] == HEAD_DIM and kv.shape[3] % KEY_TILE == 0
            and 1 <= group <= MAX_GROUP)


@intrinsic
def split_bf16_32(typingctx, src, src_index, hi, hi_index, lo, lo_index):
    """Each of the 32 floats ``x = src.flat[src_index + i]`` as ``hi.flat[hi_index + i] = bf16(x)`` and
    ``lo.flat[lo_index + i] = bf16(x - hi)`` (bits as uint16): two ``vcvtne2ps2bf16`` (AVX512-BF16),
    rounding to nearest even as ``bf16.round_bits`` does."""
    if not (all(isinstance(a, types.Array) and a.layout == "C" for a in (src, hi, lo)) and src.dtype == types.float32
            and hi.dtype == types.uint16 and lo.dtype == types.uint16):
        return None

    def codegen(context, builder, sig, args):
        f16x, i32x = ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(32), 32)
        cvt = cvt_ne2ps2bf16(builder)
        x = [builder.load(element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], f16x, 16 * h),
                          align=4) for h in range(2)]
        h = builder.call(cvt, [x[1], x[0]])
        wide = builder.shl(builder.zext(builder.bitcast(h, ir.VectorType(ir.IntType(16), 32)), i32x),
                           ir.Constant(i32x, [16] * 32))
        wide = builder.bitcast(wide, ir.VectorType(ir.FloatType(), 32))
        w = [builder.shuffle_vector(wide, wide, ir.Constant(ir.VectorType(ir.IntType(32), 16),
                                                            list(range(16 * k, 16 * k + 16)))) for k in range(2)]
        low = builder.call(cvt, [builder.fsub(x[1], w[1]), builder.fsub(x[0], w[0])])
        for val, i in ((h, 2), (low, 4)):
            builder.store(val, element_ptr(context, builder, sig.args[i], args[i], args[i + 1], sig.args[i + 1],
                                           val.type), align=2)
        return context.get_dummy_value()

    return types.void(src, src_index, hi, hi_index, lo, lo_index), codegen


@njit(cache=True, inline="always")
def split_row(src, hi, lo):
    """``split_bf16_32`` over a whole row (a multiple of 32 floats)."""
    for i in range(0, src.shape[0], 32):
        split_bf16_32(src, i, hi, i, lo, i)


@njit(cache=True)
def _attend_decodes_amx(out, q, kv, query_start_loc, block_tables, scale, soft_cap, items, mine, partials, cfg):
    """``_attend_decode`` on tiles for the decode items of ``mine`` (this thread's), each one decode
    row, kv head, key range: the same outputs and partials. One call for all of them: a call with the
    ~30 scratch arrays an item needs costs ~0.6 us in Numba, as much as scoring 40 keys."""
    group = q.shape[1] // kv.shape[2]
    block_size = kv.shape[3]
    # Q^T as VNNI B tiles: qb[c, r, 2 col + e] = dim 32 c + 2 r + e of column col (hi rows, then lo),
    # so the uint32 ``qb32[16 p + col]`` holds dims 2p, 2p + 1; qb stays zero past its first 2 group
    # columns. Flat views are made once: Numba's reshape and view cost 35-80 ns a call.
    qb = np.zeros((HEAD_DIM // 32, 16, 32), np.uint16)
    sc = np.empty((SC_TILES * KEY_TILE, 16), np.float32)  # a ring of stored scores tiles
    scores = np.empty((group, DECODE_MAX_KEYS), np.float32)
    qb32 = qb.reshape(-1).view(np.uint32)
    q_flat = q.reshape(-1)
    q_row = np.empty(HEAD_DIM, np.float32)
    q_hi = np.empty(HEAD_DIM, np.uint16)
    q_lo = np.empty(HEAD_DIM, np.uint16)
    hi32, lo32 = q_hi.view(np.uint32), q_lo.view(np.uint32)
    flat, sc_flat, scores_flat = kv.reshape(-1), sc.reshape(-1), scores.reshape(-1)
    lane_max = np.empty(16 * group, np.float32)
    unused = np.zeros(16, np.float32)  # tile_scores' int8 scales
    acc = np.empty((group, HEAD_DIM), np.float32)
    maxes = np.empty(group, np.float32)
    sums = np.empty(group, np.float32)
    v_off = kv.shape[1] * kv.shape[2] * block_size * HEAD_DIM  # kv[1] starts here
    configured = False
    for m in range(mine.shape[0]):
        t, hk, lo, hi, slot = decode_item(items, mine[m])
        if t < 0:
            continue
        if not configured:
            tile_config(cfg)
            configured = True
        table = block_tables[items[mine[m], 0]]
        n = hi - lo
        # Q^T into qb (each row split into hi and lo in vectors first)
        for g in range(group):
            base = (t * q.shape[1] + hk * group + g) * HEAD_DIM
            for d in range(HEAD_DIM):
                q_row[d] = q_flat[base + d] * scale
            split_row(q_row, q_hi, q_lo)
            for p in range(HEAD_DIM // 2):
                qb32[16 * p + g] = hi32[p]
                qb32[16 * p + group + g] = lo32[p]
        # scores: Q^T stays in tiles 2, 3; key tiles alternate between two (C, A, A) sets so one tile's
        # loads overlap the other's products; every C tile goes to its own rows of ``sc``, read after
        tile_load(2, qb, 0, 64)
        tile_load(3, qb, 512, 64)
        t_first = lo // KEY_TILE
        n_tiles = (hi - 1) // KEY_TILE + 1 - t_first
        lane_max[:] = -np.inf
        off = lo - t_first * KEY_TILE
        for i in range(0, n_tiles, 2):
            prefetch_tiles(flat, kv, table, hk, t_first, i, n_tiles, v_off)
            tile_zero(0)
            row = tile_row(kv, table, hk, (t_first + i) * KEY_TILE)
            tile_load(1, kv, row, 2 * HEAD_DIM)
            tile_load(4, kv, row + 32, 2 * HEAD_DIM)
            tile_dp_bf16(0, 1, 2)
            tile_dp_bf16(0, 4, 3)
            if i + 1 < n_tiles:
                tile_zero(5)
                row = tile_row(kv, table, hk, (t_first + i + 1) * KEY_TILE)
                tile_load(6, kv, row, 2 * HEAD_DIM)
                tile_load(7, kv, row + 32, 2 * HEAD_DIM)
                tile_dp_bf16(5, 6, 2)
                tile_dp_bf16(5, 7, 3)
                tile_store(5, sc, ((i + 1) % SC_TILES) * KEY_TILE * 16, 64)
            tile_store(0, sc, (i % SC_TILES) * KEY_TILE * 16, 64)
            # the previous pair's scores, 16 keys a vector per head (``decode_tiles``), and their maxima
            for j in range(max(i - 2, 0), i):
                ring_scores(sc_flat, j, scores_flat, off, scores.shape[1], n, group, unused, unused, lane_max)
        last_scores(sc_flat, n_tiles, scores_flat, off, scores.shape[1], n, group, unused, unused, lane_max, maxes)
        if soft_cap > 0:
            _decode_softmax(scores, group, n, soft_cap, maxes, sums)
        else:
            _exp_rows(scores, maxes, sums, group, n)
        # p @ V in AVX-512 registers: float32 p, each V row widened once for the group's heads
        acc[:] = 0.0
        decode_pv(kv, table, lo, hi, hk, scores, acc)
        _decode_finish(out, acc, maxes, sums, partials, slot, t, hk, group)
    if configured:
        tile_release()


def _attend_decodes(out, q, kv, query_start_loc, block_tables, scale, soft_cap, items, mine, partials, cfg):
    """The decode items of ``mine`` on tiles: ``_attend_decodes_amx``, or its int8-cache twin."""
    raise NotImplementedError("only callable from Numba code")


@overload(_attend_decodes)
def _attend_decodes_impl(out, q, kv, query_start_loc, block_tables, scale, soft_cap, items, mine, partials, cfg):
    kernel = attend_decodes_amx_int8 if kv.dtype == types.int8 else _attend_decodes_amx
    return lambda out, q, kv, query_start_loc, block_tables, scale, soft_cap, items, mine, partials, cfg: kernel(
        out, q, kv, query_start_loc, block_tables, scale, soft_cap, items, mine, partials, cfg)


@njit(cache=True)
def _run_items_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                   partials, worker, n_workers, cfg):
    """``paged_attention._run_items`` with decodes on tiles (configured for them alone)."""
    scale32 = np.float32(scale)
    cap32 = np.float32(soft_cap)
    mine = dealt_items(order, worker, n_workers, heads_unit(order.shape[0], kv.shape[2], n_workers))
    _attend_decodes(out, q, kv, query_start_loc, block_tables, scale32, cap32, items, mine, partials, cfg)
    for i in range(mine.shape[0]):
        item = mine[i]
        b = items[item, 0]
        seq_q0 = query_start_loc[b]
        nq = query_start_loc[b + 1] - seq_q0
        if items[item, 7] < 0:
            _attend_tile(out, q, kv, block_tables[b], seq_lens[b], seq_q0, nq, items[item, 2],
                         items[item, 3], items[item, 1], scale32, window, cap32)


@njit(cache=True, parallel=True)
def _attention_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads,
                   cfg):
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    n_workers = max(1, min(n_threads, order.shape[0]))
    for w in prange(n_workers):
        _run_items_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                       partials, w, n_workers, cfg)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def _attention_amx_serial(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile,
                          cfg):
    """``_attention_amx`` on the calling thread (steps too small to wake the pool for)."""
    items, order, partials = _plan(query_start_loc, seq_lens, kv.shape[2], q_tile, window,
                                   q.shape[1] // kv.shape[2], q.shape[2])
    _run_items_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, items, order,
                   partials, 0, 1, cfg)
    if partials.shape[0]:
        _merge_partials(out, q, items, partials, kv.shape[2])


@njit(cache=True)
def paged_attention_step_amx(out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: np.ndarray,
                             slot_mapping: np.ndarray, query_start_loc: np.ndarray, seq_lens: np.ndarray,
                             block_tables: np.ndarray, scale: float, window: int, soft_cap: float, q_tile: int,
                             n_threads: int, cfg: np.ndarray) -> None:
    """``paged_attention.paged_attention_step`` with decodes on AMX tiles (``supports(kv, group)``)."""
    write_kv(kv, k, v, slot_mapping)
    _attend_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads, cfg)


@njit(cache=True)
def _attend_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads,
                cfg):
    """``_attention_amx`` on ``n_threads`` threads, or on the calling thread alone when it is 1."""
    if n_threads > 1:
        _attention_amx(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile,
                       n_threads, cfg)
    else:
        _attention_amx_serial(out, q, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap,
                              q_tile, cfg)


@njit(cache=True)
def rope_attention_step_amx(out: np.ndarray, qkv: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray,
                            kv: np.ndarray, slot_mapping: np.ndarray, query_start_loc: np.ndarray,
                            seq_lens: np.ndarray, block_tables: np.ndarray, scale: float, window: int,
                            soft_cap: float, q_tile: int, n_threads: int, cfg: np.ndarray) -> None:
    """``paged_attention.rope_attention_step`` with decodes on AMX tiles."""
    q_rot, _ = rope_and_write(qkv, positions, cos_sin, kv, slot_mapping, out.shape[1])
    _attend_amx(out, q_rot, kv, query_start_loc, seq_lens, block_tables, scale, window, soft_cap, q_tile, n_threads,
                cfg)
