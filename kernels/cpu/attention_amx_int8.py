"""Decode attention on AMX-INT8 tiles, for an int8 KV cache (``kv_int8``) with head size 64.

The bf16 kernel (``attention_amx``) scores 16 keys with two tile loads and two ``tdpbf16ps``; here the
int8 K rows (64 codes, then their scale: 68 bytes apart) are one A tile, multiplied by ``tdpbssd``
with q as signed bytes, exactly, in int32. q keeps 16 bits: each head's row is scaled to
``x = q / s_q`` in ``[-127, 127]`` and split into ``hi = round(x)`` and ``lo = round((x - hi) * 254)``,
two columns of the B tile, so ``score = (C_hi + C_lo / 254) * s_q * s_k`` (``s_k`` the key row's
scale) differs from the float32 dot product of q with the dequantized keys by less than
``|k|_1 * s_k * s_q / 508``. The softmax and ``p @ V`` (``decode_pv``, V's scale folded into p) are
the other kernels'. Per 16 keys the cache reads 1088 bytes instead of bf16's 4096 for K and V.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from edgellm.kernels.cpu.amx import tile_config, tile_dp_bssd, tile_load, tile_release, tile_store, tile_zero
from edgellm.kernels.cpu.decode_pv import decode_pv
from edgellm.kernels.cpu.decode_tiles import (
    SC_TILES,
    decode_item,
    last_scores,
    prefetch_tiles,
    ring_scores,
    tile_row,
)
from edgellm.kernels.cpu.kv_int8 import QMAX, SCALE_BYTES, row_scale
from edgellm.kernels.cpu.paged_attention import (
    DECODE_MAX_KEYS,
    _decode_finish,
    _decode_softmax,
    _exp_rows,
    row_max,
)

HEAD_DIM = 64
ROW = HEAD_DIM + SCALE_BYTES  # bytes from one cache row to the next
KEY_TILE = 16
MAX_GROUP = 8  # hi and lo columns of each query head fill at most the 16 of a B tile
LO_SCALE = 254.0  # q's second byte carries the remainder of the first times this


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether an int8 cache ``kv [2, blocks, Hkv, block_size, 64 + 4]`` and a GQA group size take
    this kernel (the caller checks the CPU)."""
    return (kv.dtype == np.int8 and kv.shape[4] == ROW and kv.shape[3] % KEY_TILE == 0
            and 1 <= group <= MAX_GROUP)


@njit(cache=True)
def attend_decodes_amx_int8(out, q, kv, query_start_loc, block_tables, scale, soft_cap, items, mine, partials,
                            cfg):
    """``attention_amx._attend_decodes_amx`` for an int8 cache: the same items, outputs and partials."""
    group = q.shape[1] // kv.shape[2]
    # B tile: row r holds dims 4r..4r+3 of each column, hi columns 0..group-1 then lo ones
    qb = np.zeros((KEY_TILE, 64), np.int8)
    sc = np.empty((SC_TILES * KEY_TILE, 16), np.int32)  # a ring of stored scores tiles
    k_scales = np.empty(DECODE_MAX_KEYS + 2 * KEY_TILE, np.float32)
    scores = np.empty((group, DECODE_MAX_KEYS), np.float32)
    q_scales = np.empty(group, np.float32)
    q_flat, flat, sc_flat, scores_flat = q.reshape(-1), kv.reshape(-1), sc.reshape(-1), scores.reshape(-1)
    q_row = np.empty(HEAD_DIM, np.float32)
    q_hi = np.empty(HEAD_DIM, np.int8)
    q_lo = np.empty(HEAD_DIM, np.int8)
    qb32, hi32, lo32 = qb.reshape(-1).view(np.uint32), q_hi.view(np.uint32), q_lo.view(np.uint32)
    acc = np.empty((group, HEAD_DIM), np.float32)
    maxes = np.empty(group, np.float32)
    lane_max = np.empty(16 * group, np.float32)
    sums = np.empty(group, np.float32)
    v_off = kv.shape[1] * kv.shape[2] * kv.shape[3] * ROW  # kv[1] starts here
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
        for g in range(group):
            base = (t * q.shape[1] + hk * group + g) * HEAD_DIM
            for d in range(HEAD_DIM):
                q_row[d] = abs(q_flat[base + d] * scale)
            amax = row_max(q_row, HEAD_DIM)
            inv = np.float32(QMAX) / amax if amax > 0 else np.float32(0.0)
            q_scales[g] = amax / np.float32(QMAX)
            for d in range(HEAD_DIM):
                x = q_flat[base + d] * scale * inv
                h = np.rint(x)
                q_hi[d] = np.int8(h)
                q_lo[d] = np.int8(np.rint((x - h) * np.float32(LO_SCALE)))
            for r in range(HEAD_DIM // 4):  # four dims a word: B row r, columns g and group + g
                qb32[16 * r + g] = hi32[r]
                qb32[16 * r + group + g] = lo32[r]
        tile_load(2, qb, 0, 64)
        t_first = lo // KEY_TILE
        n_tiles = (hi - 1) // KEY_TILE + 1 - t_first
        lane_max[:] = -np.inf
        off = lo - t_first * KEY_TILE
        for i in range(0, n_tiles, 2):
            prefetch_tiles(flat, kv, table, hk, t_first, i, n_tiles, v_off)
            tile_zero(0)
            row = tile_row(kv, table, hk, (t_first + i) * KEY_TILE)
            tile_load(1, flat, row, ROW)
            tile_dp_bssd(0, 1, 2)
            if i + 1 < n_tiles:
                tile_zero(3)
                row2 = tile_row(kv, table, hk, (t_first + i + 1) * KEY_TILE)
                tile_load(4, flat, row2, ROW)
                tile_dp_bssd(3, 4, 2)
                tile_store(3, sc, ((i + 1) % SC_TILES) * KEY_TILE * 16, 64)
                for e in range(KEY_TILE):
                    k_scales[(i + 1) * KEY_TILE + e] = row_scale(flat, row2 + e * ROW + HEAD_DIM)
            tile_store(0, sc, (i % SC_TILES) * KEY_TILE * 16, 64)
            for e in range(KEY_TILE):
                k_scales[i * KEY_TILE + e] = row_scale(flat, row + e * ROW + HEAD_DIM)
            # the previous pair's scores, 16 keys a vector per head (``decode_tiles``), and their maxima
            for j in range(max(i - 2, 0), i):
                ring_scores(sc_flat, j, scores_flat, off, scores.shape[1], n, group, q_scales, k_scales, lane_max)
        last_scores(sc_flat, n_tiles, scores_flat, off, scores.shape[1], n, group, q_scales, k_scales, lane_max, maxes)
        if soft_cap > 0:
            _decode_softmax(scores, group, n, soft_cap, maxes, sums)
        else:
            _exp_rows(scores, maxes, sums, group, n)
        acc[:] = 0.0
        decode_pv(kv, table, lo, hi, hk, scores, acc)
        _decode_finish(out, acc, maxes, sums, partials, slot, t, hk, group)
    if configured:
        tile_release()

