"""Packed int4 weights times bf16 rows on AMX tiles, reading ATen's int4 layout in place.

ATen's ``_weight_int4pack_mm_for_cpu`` dequantizes the whole weight again for every four rows, so
its cost grows linearly with the batch: at 32 rows it was the biggest part of a decode step. Here
each weight is widened once per call, whatever the row count, and multiplied on AMX tiles.

The weight stays in ATen's packed layout, ``packed [N/64, K, 32]`` uint8, where byte ``i`` of
``(block, k)`` holds column ``64 block + i`` in its low nibble and ``64 block + 32 + i`` in its high
one, with ``scale_zeros [K/32, N, 2]`` bf16: ``w = (q - 8) * scale + zero``. Each weight is computed
in float32 and rounded once to bf16, exactly as the bf16 expansion (``bf16_expand.py``) does for big
steps; the tiles multiply bf16 pairs and accumulate in float32, and the result is rounded to bf16.

Work is dealt out in panels of 32 output columns (two 16-column tiles of one nibble half), so each
thread widens its own panels; two 16-row tiles take 32 rows at a time.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import (
    cvt_ne2ps2bf16,
    element_ptr,
    tile_config,
    tile_dp_bf16,
    tile_load,
    tile_release,
    tile_store,
    zero_accumulators,
)
from edgellm.kernels.cpu.prefetch import CACHE_LINE, prefetch_l2
from edgellm.kernels.cpu.unmanaged import flat

MAX_ROWS = 32
GROUP = 32
# widened weights a thread keeps for steps of more than MAX_ROWS rows: half the 2 MiB L2 of the AMX
# Xeons measured (a 682-row prompt step op by op: 0.75 MiB 1.13x, 1 MiB 1.16x, 1.5 MiB 1.15x)
WIDENED_BYTES = 1 << 20
# inputs up to this many bytes stay in L2 through a panel at a time, whose widened weight then stays in
# L1 (256 rows x 576: runs of panels 0.79-1.11x a linear)
X_RUN_BYTES = 512 << 10
FASTMATH = {"reassoc", "contract"}
# groups a chunk widens ahead of the one it multiplies: the tile loads then read a group whose stores
# have long retired (the 120 linears of a 32-row step, cold: 10.12 -> 9.82 ms against widening each
# group just before its products; 3 ahead: 9.89 against 9.51)
WIDEN_AHEAD = 2


# pairs (row k, row k + 1) of each column, from [16 of row k, 16 of row k + 1]
_INTERLEAVE = ir.Constant(ir.VectorType(ir.IntType(32), 32), [(j % 2) * 16 + j // 2 for j in range(32)])


@intrinsic
def _widen_group(typingctx, packed, row0, shift, sz, sz_index, out):
    """Both B tiles of one group: ``out.flat[32 r + i] = bf16(w(2 r, i)) | bf16(w(2 r + 1, i)) << 16`` for
    ``r < 16``, ``i < 32`` (VNNI rows of bf16 pairs; tile 0 in ``i < 16``), with ``w(k, i) = nibble *
    scale[i] + (zero[i] - 8 scale[i])``, the nibbles (half ``shift``) of the 32 weight rows of 32 bytes from
    flat byte ``row0``, and ``sz.flat[sz_index + i]`` holding column ``i``'s bf16 scale (low half) and zero
    (high half). The scales and zeros are widened once and held in registers for all 16 row pairs (read
    per row pair from memory, the widening cost 4 % more); 16-lane AVX-512 vectors, ``vcvtne2ps2bf16``
    rounding to nearest even, as ``torch.Tensor.to(torch.bfloat16)`` does."""
    if not (isinstance(shift, types.IntegerLiteral) and shift.literal_value in (0, 4)):
        return None  # a constant nibble half: the low one needs only a mask, the high one only a shift
    if not (isinstance(packed, types.Array) and packed.dtype == types.uint8 and packed.layout == "C"
            and isinstance(sz, types.Array) and sz.dtype == types.uint32 and sz.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.uint32 and out.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        i32, f32, i64 = ir.IntType(32), ir.FloatType(), ir.IntType(64)
        v16 = lambda t: ir.VectorType(t, 16)  # noqa: E731
        t_packed, t_row0, t_shift, t_sz, t_szi, t_out = sig.args
        a_packed, a_row0, _, a_sz, a_szi, a_out = args
        high = t_shift.literal_value == 4
        splat = lambda t, v: ir.Constant(v16(t), [v] * 16)  # noqa: E731
        cvt = cvt_ne2ps2bf16(builder)
        scales, zeros = [], []
        for h in range(2):  # columns 16 h .. 16 h + 15
            v = builder.load(element_ptr(context, builder, t_sz, a_sz, a_szi, t_szi, v16(i32), 16 * h), align=4)
            sc = builder.bitcast(builder.shl(v, splat(i32, 16)), v16(f32))
            ze = builder.bitcast(builder.and_(v, splat(i32, 0xFFFF0000 - (1 << 32))), v16(f32))
            scales.append(sc)
            zeros.append(builder.fsub(ze, builder.fmul(sc, splat(f32, 8.0))))
        row0 = context.cast(builder, a_row0, t_row0, types.int64)
        for r in range(16):
            for h in range(2):
                w = []
                for e in range(2):  # rows 2 r and 2 r + 1
                    start = builder.add(row0, ir.Constant(i64, 64 * r + 32 * e + 16 * h))
                    b = builder.load(element_ptr(context, builder, t_packed, a_packed, start, types.int64,
                                                 v16(ir.IntType(8))), align=1)
                    wide = builder.zext(b, v16(i32))
                    q = builder.lshr(wide, splat(i32, 4)) if high else builder.and_(wide, splat(i32, 15))
                    w.append(builder.fadd(builder.fmul(builder.uitofp(q, v16(f32)), scales[h], flags=('contract',)),
                                          zeros[h], flags=('contract',)))
                both = builder.call(cvt, [w[1], w[0]])  # lanes 0-15: row 2 r, 16-31: row 2 r + 1
                pairs = builder.bitcast(builder.shuffle_vector(both, both, _INTERLEAVE), v16(i32))
                dst = ir.Constant(i64, 32 * r + 16 * h)
                builder.store(pairs, element_ptr(context, builder, t_out, a_out, dst, types.int64, v16(i32)), align=4)
        return context.get_dummy_value()

    return types.void(packed, row0, shift, sz, sz_index, out), codegen


@intrinsic
def store_bf16_32(typingctx, src, src_index, dst, dst_index):
    """``dst.flat[dst_index + i] = bf16(src.flat[src_index + i])`` for ``i < 32`` (bits as uint16),
    one ``vcvtne2ps2bf16``: round to nearest even, NaN stays NaN."""
    if not (isinstance(src, types.Array) and src.dtype == types.float32 and src.layout == "C"
            and isinstance(dst, types.Array) and dst.dtype == types.uint16):
        return None

    def codegen(context, builder, sig, args):
        def half(offset):  # 16 floats
            ptr = element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              ir.VectorType(ir.FloatType(), 16), offset)
            return builder.load(ptr, align=4)

        lo, hi = half(0), half(16)
        out = builder.call(cvt_ne2ps2bf16(builder), [hi, lo])
        builder.store(out, element_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], out.type), align=2)
        return context.get_dummy_value()

    return types.void(src, src_index, dst, dst_index), codegen


@njit(cache=True, inline="always")
def widen_group(packed, sz, block, shift, n0, g, b32):
    """Group ``g`` of the panel at columns ``n0:n0+32``, nibble half ``shift`` of 64-column block
    ``block``, into ``b32 [16, 32]`` (C-contiguous): both its B tiles (``_widen_group``)."""
    row0 = (block * packed.shape[1] + g * GROUP) * 32
    if shift == 0:
        _widen_group(packed, row0, 0, sz, g * sz.shape[1] + n0, b32)
    else:
        _widen_group(packed, row0, 4, sz, g * sz.shape[1] + n0, b32)


@njit(cache=True, inline="always")
def panel_at(p):
    """``(block, shift, n0)`` of panel ``p``: its 64-column block, nibble half and first column."""
    return p // 2, 4 * (p % 2), 64 * (p // 2) + 32 * (p % 2)


@njit(cache=True, inline="always")
def widen_panel(packed, sz, p, tiles):
    """Every group of panel ``p`` into ``tiles [K/32, 16, 32]`` (``widen_group``, group by group)."""
    block, shift, n0 = panel_at(p)
    for g in range(tiles.shape[0]):
        widen_group(packed, sz, block, shift, n0, g, tiles[g])


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _chunk(x, tail, r0, rows, tiles, widen, packed, sz, p, cbuf, pend, out, ahead, packed1, sz1):
    """One chunk of up to 32 rows from ``r0`` times panel ``p``'s widened groups ``tiles`` (widened here,
    group by group, ``WIDEN_AHEAD`` groups before their products, where ``widen``), its sums stored
    into the half of ``cbuf`` that ``pend[3]`` does not name; the chunk before, which ``pend`` names
    (``[rows, r0, n0, half]``), is rounded to bf16 into ``out`` two rows a group meanwhile. ``pend``
    then names this one.

    Where ``ahead`` (a next panel to widen), each group also asks for its counterparts ahead into L2
    (``packed1``, ``sz1``: the weight flat): panel ``p + 1``'s two lines of scale-zeros, a row of lines
    ``N * 4`` bytes apart that no hardware prefetcher follows, and half of the group's 32 rows of the
    next block's packed bytes (the first half during a block's first panel, the second during its
    second), which the block's own two panels share."""
    k = x.shape[1]
    n = out.shape[1]
    groups = k // GROUP
    two = rows > 16
    block, shift, n0 = panel_at(p)
    # A tiles read whole 16-row blocks: a partial last block comes from ``tail``
    a0, o0 = (x, r0 * k) if r0 + 16 <= x.shape[0] else (tail, 0)
    a1, o1 = (x, (r0 + 16) * k) if r0 + 32 <= x.shape[0] else (tail, 0)
    done_rows, done_r0, done_n0, done = pend[0], pend[1], pend[2], pend[3] * MAX_ROWS * 32
    mine = MAX_ROWS * 32 - done
    zero_accumulators(two)
    if widen:
        for g in range(min(WIDEN_AHEAD, groups)):
            widen_group(packed, sz, block, shift, n0, g, tiles[g])
    for g in range(groups):
        if widen and g + WIDEN_AHEAD < groups:
            widen_group(packed, sz, block, shift, n0, g + WIDEN_AHEAD, tiles[g + WIDEN_AHEAD])
        tile_load(6, tiles, g * 512, 128)
        tile_load(7, tiles, g * 512 + 16, 128)
        tile_load(4, a0, o0 + g * GROUP, 2 * k)
        tile_dp_bf16(0, 4, 6)
        tile_dp_bf16(1, 4, 7)
        if two:
            tile_load(5, a1, o1 + g * GROUP, 2 * k)
            tile_dp_bf16(2, 5, 6)
            tile_dp_bf16(3, 5, 7)
        if ahead:
            prefetch_l2(sz1, g * n + n0 + 32)  # panel p + 1 starts at column n0 + 32
            prefetch_l2(sz1, g * n + n0 + 48)
            if block + 1 < packed.shape[0]:
                at = ((block + 1) * k + g * GROUP) * 32 + (p % 2) * GROUP * 16
                for c in range(at, at + GROUP * 16, CACHE_LINE):
                    prefetch_l2(packed1, c)
        for i in range(2 * g, min(2 * g + 2, done_rows)):
            store_bf16_32(cbuf, done + 32 * i, out, (done_r0 + i) * n + done_n0)
    for i in range(2 * groups, done_rows):  # K under 512: more rows than two a group
        store_bf16_32(cbuf, done + 32 * i, out, (done_r0 + i) * n + done_n0)
    tile_store(0, cbuf, mine, 128)
    tile_store(1, cbuf, mine + 16, 128)
    if two:
        tile_store(2, cbuf, mine + 512, 128)
        tile_store(3, cbuf, mine + 528, 128)
    pend[0], pend[1], pend[2], pend[3] = rows, r0, n0, 1 - pend[3]


@njit(cache=True, fastmath=FASTMATH)
def _panels(x, tail, packed, sz, out, m, cfg, p0, p1):
    """Output columns ``32 p0 : 32 p1`` of ``out [m, N]`` (bf16 bits) from the first ``m`` rows of ``x``.
    A 16-row block that ``x`` does not hold whole is read from ``tail [16, K]`` instead: ``x``'s rows of
    it, then zeros.

    Each panel's weight is widened once, group by group, into 16 x 32 words a group (36 KiB a panel
    at K = 576) and multiplied on up to four accumulator tiles per 32-row chunk of ``x``. Up to 32
    rows, groups are widened two ahead of their products, inside the panel's pass (1.35x faster than
    widening the whole panel first), and each asks for the next panel's group (``_chunk``'s
    ``ahead``): the 120 linears of 30 SmolLM2-shaped layers at 32 rows, cold, 12.4-13.5 -> 10.9-11.5
    ms. On the AMX Xeons measured, the tile instructions and the AVX-512 widening do not run at the
    same time (their costs add up: ~71 and ~82 ns a group at 32 rows with real data). More rows widen
    a panel first and take every chunk through it; where ``x`` is over ``X_RUN_BYTES``, as many panels
    as ``WIDENED_BYTES`` holds are widened first and each chunk taken through all of them: ``x`` is
    read once per such run of panels, not once a panel (682 rows: 0.8-2.1 MB, more than L2 holds
    beside the rest; a 682-row prompt step 1.07-1.16x faster).

    A chunk's float32 sums, stored from the tiles, are rounded to bf16 into ``out`` two rows a group
    during the next chunk's products (or the next panel's): converted straight after its own, the
    loads waited for the tile stores, which waited for the last products, while the tiles sat idle
    (30 % of a 682 x 576 -> 3,072 product).
    """
    groups = x.shape[1] // GROUP
    big = m > MAX_ROWS and 2 * m * x.shape[1] > X_RUN_BYTES
    per_run = max(1, WIDENED_BYTES // (groups * 2048)) if big else 1
    tiles = np.empty((min(per_run, p1 - p0), groups, 16, 32), np.uint32)
    cbuf = np.empty((2 * MAX_ROWS, 32), np.float32)  # two chunks' sums: one being stored, one converted
    pend = np.zeros(4, np.int64)
    tile_config(cfg)
    packed1, sz1 = flat(packed), flat(sz)
    if m <= MAX_ROWS:
        for p in range(p0, p1):
            _chunk(x, tail, 0, m, tiles[0], True, packed, sz, p, cbuf, pend, out, p + 1 < p1, packed1, sz1)
    runs = 0 if m <= MAX_ROWS else -(-(p1 - p0) // per_run)
    for run in range(runs):  # runs of panels as even as they come
        q0, q1 = p0 + run * (p1 - p0) // runs, p0 + (run + 1) * (p1 - p0) // runs
        for p in range(q0, q1):
            widen_panel(packed, sz, p, tiles[p - q0])
        for r0 in range(0, m, MAX_ROWS):
            for p in range(q0, q1):
                _chunk(x, tail, r0, min(MAX_ROWS, m - r0), tiles[p - q0], False, packed, sz, p, cbuf, pend, out,
                       False, packed1, sz1)
    done = pend[3] * MAX_ROWS * 32
    for i in range(pend[0]):
        store_bf16_32(cbuf, done + 32 * i, out, (pend[1] + i) * out.shape[1] + pend[2])
    tile_release()


@njit(cache=True)
def _tail_rows(x):
    """The last ``M % 16`` rows of ``x`` (bf16 bits) zero-padded to one 16-row A tile; copying only
    these, not all of ``x``, saved 20-50 us a call at 100-250 rows (ragged steps' every linear)."""
    full = x.shape[0] // 16 * 16
    tail = np.zeros((16 if full < x.shape[0] else 1, x.shape[1]), np.uint16)
    tail[:x.shape[0] - full] = x[full:]
    return tail


@njit(cache=True, parallel=True)
def int4_amx_matmul(x: np.ndarray, packed: np.ndarray, sz: np.ndarray, out: np.ndarray, cfg: np.ndarray,
                    n_threads: int) -> None:
    """``out [M, N] = x [M, K] @ W^T`` in bf16 bits (uint16), for ``N % 64 == 0`` and ``K % 32 == 0``.

    ``packed`` is ATen's int4 weight viewed as ``[N/64, K, 32]``, ``sz`` its scale-zeros ``[K/32, N]``
    as uint32 (each the bf16 pair), ``cfg`` from ``amx.make_config()``.
    """
    xc = np.ascontiguousarray(x)
    tail = _tail_rows(xc)
    n_panels = out.shape[1] // 32
    workers = max(1, min(n_threads, n_panels))
    for w in prange(workers):
        _panels(xc, tail, packed, sz, out, x.shape[0], cfg, w * n_panels // workers, (w + 1) * n_panels // workers)
