"""The AMX decode kernels' shared steps: prefetching a tile pair's rows, and stored scores tiles to
per-head score rows in vectors.

The AMX decode kernels store each 16-key scores tile as ``C[16 keys, 16 columns]``: query head ``g``'s
hi part in column ``g`` and its lo part in column ``group + g``. Read back key by key and head by
head, that is a strided scalar loop (~16 cycles a key for three heads, as much as the tile products).
``tile_scores`` loads the tile's 16 rows, transposes them in registers (``vec16.transpose16``) and
computes each head's 16 scores as one vector, stored (masked to the item's keys) into its row of
``scores``; each head's running max stays a vector (lane-wise), reduced once per item. Float32 tiles (bf16 kernel) sum hi and lo;
int32 tiles (int8 kernel) take ``(hi + lo / 254) * s_q[g] * s_k[key]``.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.paged_attention import row_max
from edgellm.kernels.cpu.prefetch import prefetch
from edgellm.kernels.cpu.vec16 import splat, transpose16

MAX_GROUP = 8
KEY_TILE = 16
# the kernels store tiles into a ring of SC_TILES and read each back two tiles later: 4 KiB that stay in
# L1 (a slot for every tile of a 512-key item, 35 KiB, ran 3.5 % slower over 30 layers' caches)
SC_TILES = 4
CACHE_LINE = 64


@njit(cache=True, inline="always")
def decode_item(items, item):
    """``(t, hk, lo, hi, slot)`` of a work item (``paged_attention._plan``): its query row, kv head, key
    range and partial slot; ``t = -1`` for a prompt tile, which the AVX-512 kernel takes."""
    return items[item, 7], items[item, 1], items[item, 4], items[item, 5], items[item, 6]


@njit(cache=True, inline="always")
def tile_row(kv, table, hk, key):
    """Flat index of ``kv[0, table[key // block_size], hk, key % block_size, 0]`` (rows of ``kv.shape[4]``
    elements: bf16 bits, or an int8 cache's codes and scale)."""
    block_size = kv.shape[3]
    return ((table[key // block_size] * kv.shape[2] + hk) * block_size + key % block_size) * kv.shape[4]


@njit(cache=True, inline="always")
def prefetch_tiles(flat, kv, table, hk, t_first, i, n_tiles, v_off):
    """Before tiles ``i, i + 1`` of an item (from key tile ``t_first``) multiply: ask for their V rows
    (read by ``p @ V`` after the scores) and the K rows two tiles ahead. Paged blocks are scattered
    pieces the hardware prefetchers start cold on (3 % of a 32-stream decode step in an A/B run)."""
    span, step = KEY_TILE * kv.shape[4], CACHE_LINE // kv.itemsize
    for j in range(i, min(i + 2, n_tiles)):
        v_row = v_off + tile_row(kv, table, hk, (t_first + j) * KEY_TILE)
        for e in range(0, span, step):
            prefetch(flat, v_row + e)
        if j + 2 < n_tiles:
            k_row = tile_row(kv, table, hk, (t_first + j + 2) * KEY_TILE)
            for e in range(0, span, step):
                prefetch(flat, k_row + e)
LO_WEIGHT = 1.0 / 254.0  # an int8 tile's lo column carries q's remainder times 254


@intrinsic
def tile_scores(typingctx, sc, sc_index, out, o, stride, n, group, q_scales, k_scales, k_index, maxes):
    """``out.flat[g stride + o + e] = score(g, e)`` for the lanes ``0 <= o + e < n`` of the 16 keys ``e``
    of the tile at ``sc.flat[sc_index + 16 e + c]``, and ``maxes[16 g + e] = max(maxes[16 g + e], score(g,
    e))`` over those lanes, for heads ``g < group`` (1 to 8). ``sc`` float32: ``score = C[e, g] + C[e, group + g]``; int32:
    ``(C[e, g] + C[e, group + g] / 254) * q_scales[g] * k_scales[k_index + e]``."""
    if not (isinstance(sc, types.Array) and sc.dtype in (types.float32, types.int32) and all(
            isinstance(a, types.Array) and a.dtype == types.float32 for a in (out, q_scales, k_scales, maxes))):
        return None

    def codegen(context, builder, sig, args):
        t_sc, t_sci, t_out, t_o, t_stride, t_n, t_group, t_qs, t_ks, t_ki, t_max = sig.args
        v_sc, v_sci, v_out, v_o, v_stride, v_n, v_group, v_qs, v_ks, v_ki, v_max = args
        i1, i32, i64, f32 = ir.IntType(1), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16f, v16i = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
        as64 = lambda v, t: context.cast(builder, v, t, types.int64)  # noqa: E731
        o, stride, n = as64(v_o, t_o), as64(v_stride, t_stride), as64(v_n, t_n)
        int8 = t_sc.dtype == types.int32
        rows = [builder.load(element_ptr(context, builder, t_sc, v_sc, v_sci, t_sci, v16i, offset=16 * e), align=4)
                for e in range(16)]
        cols = transpose16(builder, rows)
        lanes = builder.add(splat(builder, o), ir.Constant(ir.VectorType(i64, 16), list(range(16))))
        zero = ir.Constant(ir.VectorType(i64, 16), [0] * 16)
        mask = builder.and_(builder.icmp_signed(">=", lanes, zero), builder.icmp_signed("<", lanes, splat(builder, n)))
        store = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [v16f, v16f.as_pointer(), i32, ir.VectorType(i1, 16)]), "llvm.masked.store.v16f32.p0")
        minus_inf = ir.Constant(v16f, [float("-inf")] * 16)
        ks = (builder.load(element_ptr(context, builder, t_ks, v_ks, v_ki, t_ki, v16f), align=4) if int8 else None)

        def emit(heads):
            for g in range(heads):
                hi, lo = cols[g], cols[heads + g]
                if int8:
                    hi, lo = builder.sitofp(hi, v16f), builder.sitofp(lo, v16f)
                    s = builder.fadd(hi, builder.fmul(lo, ir.Constant(v16f, [LO_WEIGHT] * 16)))
                    qs = builder.load(element_ptr(context, builder, t_qs, v_qs, ir.Constant(i64, g), types.int64, f32))
                    s = builder.fmul(s, builder.fmul(splat(builder, qs), ks))
                else:
                    s = builder.fadd(builder.bitcast(hi, v16f), builder.bitcast(lo, v16f))
                at = builder.add(builder.mul(ir.Constant(i64, g), stride), o)
                builder.call(store, [s, element_ptr(context, builder, t_out, v_out, at, types.int64, v16f),
                                     ir.Constant(i32, 4), mask])
                m_ptr = element_ptr(context, builder, t_max, v_max, ir.Constant(i64, 16 * g), types.int64, v16f)
                s = builder.select(mask, s, minus_inf)
                old = builder.load(m_ptr, align=4)
                builder.store(builder.select(builder.fcmp_ordered(">", s, old), s, old), m_ptr, align=4)

        emit_cases(builder, as64(v_group, t_group), list(range(1, MAX_GROUP + 1)), emit)
        return context.get_dummy_value()

    return types.void(sc, sc_index, out, o, stride, n, group, q_scales, k_scales, k_index, maxes), codegen


@njit(cache=True, inline="always")
def ring_scores(sc_flat, j, scores_flat, off, stride, n, group, q_scales, k_scales, lane_max):
    """``tile_scores`` for an item's tile ``j`` (keys ``16 j - off`` on of its rows), stored in ring slot
    ``j % SC_TILES``."""
    tile_scores(sc_flat, (j % SC_TILES) * KEY_TILE * 16, scores_flat, j * KEY_TILE - off, stride, n, group, q_scales,
                k_scales, j * KEY_TILE, lane_max)


@njit(cache=True, inline="always")
def last_scores(sc_flat, n_tiles, scores_flat, off, stride, n, group, q_scales, k_scales, lane_max, maxes):
    """The item's last tile pair through ``ring_scores``, then each head's max from its lanes."""
    for j in range((n_tiles - 1) // 2 * 2, n_tiles):
        ring_scores(sc_flat, j, scores_flat, off, stride, n, group, q_scales, k_scales, lane_max)
    for g in range(group):
        maxes[g] = row_max(lane_max[16 * g:16 * g + 16], 16)
