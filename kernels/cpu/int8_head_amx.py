"""The greedy head's int8 copy times int16 activations on AMX-INT8 tiles.

``out [M, N] = s[:, None] * (xq @ qw^T) * scale``: ``int8_gemv``'s numbers bit for bit (exact int32
sums, then two float32 scalings) from its int16 activations ``xq`` and int8 weights ``qw [N, K]``.
Tiles multiply bytes, so each activation splits as ``xq = 256 hi + lo`` (hi signed, lo unsigned):
``tdpbssd`` and ``tdpbsud`` sum the two halves' products exactly and ``256 C_hi + C_lo`` is the
int32 sum (``int8_gemv.xq_limit`` keeps it in range). The weight rows are the A tiles straight from
memory, prefetched into L2 eight tiles ahead (``int8_amx`` widens every weight to bf16 first, which
cost more than reading it); the activations' bytes, regrouped in fours once per call, are the B tiles. A
16 x 16 transpose turns each C tile (weight rows by activation rows) into output rows.

Example::

    xq, s = quantize_rows_int16(x, xq_limit(k))
    x_n, act_n = q8_0.row_norms(x, xq * s[:, None])
    screen = screen_arrays(m, n, n, err_norm, w_norm, x_n, act_n)
    int8_head_amx(xq, s, qw, scale, out, amx.make_config(), 2, screen)
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import (
    element_ptr,
    tile_config,
    tile_dp_bssd,
    tile_dp_bsud,
    tile_load,
    tile_release,
    tile_store,
    zero_accumulators,
)
from edgellm.kernels.cpu.head_screen import bounds16
from edgellm.kernels.cpu.prefetch import CACHE_LINE, prefetch_l2
from edgellm.kernels.cpu.vec16 import F32X16, const16, splat, transpose16

K_TILE = 64  # bytes of K per tile product
SCREEN_COLS = 16  # columns a bound covers: one C tile's
# weight tiles (16 rows, 9 KiB at K = 576) asked for ahead, into L2 only: on the AMX Xeon a cold 32-row
# step over SmolLM2's 28 MB head took 2.08 ms against 2.70 with four tiles into every level (L1's
# fill buffers then hold up the tile loads); 4 to 16 tiles ahead into L2 all read 2.03-2.19 ms
PREFETCH_TILES = 8
STREAM_MIN_BYTES = 2 << 20


def supports(n: int, k: int) -> bool:
    """Whether a head ``[n, k]`` fits the tiles (the caller checks the CPU: ``amx.amx_int8_supported``)."""
    return n % 16 == 0 and k % K_TILE == 0


@njit(cache=True)
def split_activations(xq):
    """``(hi int8, lo uint8)``, each ``[M/16 rounded up, K/64, 16, 64]``: B tile ``(t, kt)``, row ``r``,
    byte ``4 c + e`` holds the high (signed) or low (unsigned) byte of ``xq[16 t + c, 64 kt + 4 r + e]``;
    rows past M are zeros."""
    m, k = xq.shape
    hi = np.zeros(((m + 15) // 16, k // K_TILE, 16, 64), np.int8)
    lo = np.zeros(((m + 15) // 16, k // K_TILE, 16, 64), np.uint8)
    for i in range(m):
        t, c = i // 16, i % 16
        for j in range(k):
            v = np.int32(xq[i, j])
            kt, r, e = j // K_TILE, j % K_TILE // 4, j % 4
            hi[t, kt, r, 4 * c + e] = np.int8(v >> 8)
            lo[t, kt, r, 4 * c + e] = np.uint8(v & 0xFF)
    return hi, lo


@intrinsic
def _store_tile(typingctx, acc, s, c0, scale, n0, out, n_cols, count, streaming, screen):
    """Output rows ``c0 + c`` (``c < count``), columns ``n0 : n0 + 16`` of ``out`` (float32, row length
    ``n_cols``) from the int32 C tiles in ``acc``: high halves' sums ``acc[16 i + c]``, low halves'
    ``acc[256 + 16 i + c]`` (weight row ``i``, activation row ``c``), as
    ``float(256 hi + lo) * s[c0 + c] * scale[n0 + i]``; ``s`` has 16 readable entries from ``c0``.
    Where ``streaming`` is true each 64-byte row piece goes past the caches (``movntps``: the caller
    has ``out`` and its rows on cache lines and fences after).

    ``screen = (valid, err_norm, w_norm, x_n, act_n, lows, highs)`` also bounds the 16 columns as
    ``head_screen.store_screened`` bounds its 48: ``lows[n0 / 16, c0 + c] = max_i (v - e)`` and
    ``highs`` the largest ``v + e`` over the columns ``n0 + i < valid`` (-inf where none is), with
    ``e = x_n[c0 + c] err_norm[n0 + i] + act_n[c0 + c] w_norm[n0 + i] + |v| 2^-7``. Taken before the
    transpose, where a vector holds one column for 16 rows, the maxima are 15 vector max each, no
    horizontal reduction; ``x_n``, ``act_n`` and a row of ``lows`` and ``highs`` have 16 readable
    entries from ``c0``."""
    if not (isinstance(streaming, types.Boolean) and isinstance(acc, types.Array) and acc.dtype == types.int32 and acc.layout == "C"
            and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in (s, scale, out))
            and all(isinstance(t, types.Integer) for t in (c0, n0, n_cols, count))
            and isinstance(screen, types.BaseTuple) and len(screen) == 7 and isinstance(screen[0], types.Integer)
            and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in screen[1:])):
        return None

    def codegen(context, builder, sig, args):
        t_acc, t_s, t_c0, t_scale, t_n0, t_out, t_cols, t_count, _, t_screen = sig.args
        a_acc, a_s, a_c0, a_scale, a_n0, a_out, a_cols, a_count, a_streaming, a_screen = args
        i16, f16 = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.FloatType(), 16)
        i64 = ir.IntType(64)
        zero = context.get_constant(types.intp, 0)
        s_vec = builder.load(element_ptr(context, builder, t_s, a_s, a_c0, t_c0, f16), align=4)
        rows = []
        for i in range(16):
            hi = builder.load(element_ptr(context, builder, t_acc, a_acc, zero, types.intp, i16, 16 * i), align=4)
            lo = builder.load(element_ptr(context, builder, t_acc, a_acc, zero, types.intp, i16, 256 + 16 * i), align=4)
            total = builder.add(builder.shl(hi, ir.Constant(i16, [8] * 16)), lo)
            rows.append(builder.bitcast(builder.fmul(builder.sitofp(total, f16), s_vec), i16))
        _screen_tile(context, builder, [builder.bitcast(r, f16) for r in rows], a_c0, t_c0, t_scale, a_scale, a_n0,
                     t_n0, t_screen, a_screen)
        rows = transpose16(builder, rows)
        scale_vec = builder.load(element_ptr(context, builder, t_scale, a_scale, a_n0, t_n0, f16), align=4)
        c0 = context.cast(builder, a_c0, t_c0, types.int64)
        n0 = context.cast(builder, a_n0, t_n0, types.int64)
        cols = context.cast(builder, a_cols, t_cols, types.int64)
        count = context.cast(builder, a_count, t_count, types.int64)
        for c in range(16):
            with cgutils.if_likely(builder, builder.icmp_signed("<", ir.Constant(i64, c), count)):
                at = builder.add(builder.mul(builder.add(c0, ir.Constant(i64, c)), cols), n0)
                val = builder.fmul(builder.bitcast(rows[c], f16), scale_vec)
                ptr = element_ptr(context, builder, t_out, a_out, at, types.int64, f16)
                with builder.if_else(a_streaming) as (past_caches, cached):
                    with past_caches:
                        st = builder.store(val, ptr, align=64)
                        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
                    with cached:
                        builder.store(val, ptr, align=4)
        return context.get_dummy_value()

    return types.void(acc, s, c0, scale, n0, out, n_cols, count, streaming, screen), codegen


def _screen_tile(context, builder, cols, a_c0, t_c0, t_scale, a_scale, a_n0, t_n0, t_screen, a_screen):
    """``_store_tile``'s bounds: ``cols[i]`` holds column ``n0 + i`` for the tile's 16 rows (before
    its scale)."""
    f32, i64 = ir.FloatType(), ir.IntType(64)
    items = [builder.extract_value(a_screen, j) for j in range(7)]
    t_items = list(t_screen)
    valid = context.cast(builder, items[0], t_items[0], types.int64)
    n0 = context.cast(builder, a_n0, t_n0, types.int64)
    c0 = context.cast(builder, a_c0, t_c0, types.int64)

    def ptr(j, index, pointee, offset=0):
        return element_ptr(context, builder, t_items[j], items[j], index, types.int64, pointee, offset)

    vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32X16, [F32X16, F32X16]),
                                          "llvm.maxnum.v16f32")
    x_n = builder.load(ptr(3, c0, F32X16), align=4)
    act_n = builder.load(ptr(4, c0, F32X16), align=4)
    lo = hi = const16(float("-inf"))
    for i in range(16):
        n = builder.add(n0, ir.Constant(i64, i))
        scale = splat(builder, builder.load(element_ptr(context, builder, t_scale, a_scale, n, types.int64, f32)))
        v = builder.fmul(cols[i], scale)
        err = splat(builder, builder.load(ptr(1, n, f32)))
        wn = splat(builder, builder.load(ptr(2, n, f32)))
        low, high = bounds16(builder, v, x_n, err, act_n, wn)
        inside = builder.icmp_signed("<", n, valid)
        lo = builder.select(inside, builder.call(vmax, [lo, low]), lo)
        hi = builder.select(inside, builder.call(vmax, [hi, high]), hi)
    rows = context.cast(builder, builder.extract_value(context.make_array(t_items[5])(
        context, builder, items[5]).shape, 1), types.intp, types.int64)
    at = builder.add(builder.mul(builder.udiv(n0, ir.Constant(i64, 16)), rows), c0)
    builder.store(lo, ptr(5, at, F32X16), align=4)
    builder.store(hi, ptr(6, at, F32X16), align=4)


@intrinsic
def _store_fence(typingctx):
    """``sfence``: this thread's streaming stores are visible before anything it writes after."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True)
def _weight_tiles(qw, hi, lo, s_pad, scale, out, m, cfg, t0, t1, screen):
    """Output columns ``16 t0 : 16 t1`` for every activation row, two 16-row B tiles at a time."""
    k = qw.shape[1]
    n = out.shape[1]
    kt_n = k // K_TILE
    flat, hi_f, lo_f = qw.reshape(-1), hi.reshape(-1), lo.reshape(-1)
    acc = np.empty(512, np.int32)  # one 16-row chunk's two C tiles, read out before the next are stored
    # logits past L2's size (6 MB for 32 rows of SmolLM2's head) stream to memory: written through the
    # caches, each line was read first (2.00 -> 1.78 ms a cold 32-row step; the re-scoring after it,
    # which now reads them from memory, took ~0.01 ms longer)
    streaming = out.ctypes.data % CACHE_LINE == 0 and n % 16 == 0 and out.nbytes >= STREAM_MIN_BYTES
    tile_config(cfg)
    for t in range(t0, t1):
        n0 = 16 * t
        ahead = (n0 + 16 * PREFETCH_TILES) * k
        for c0 in range(0, m, 32):
            two = m - c0 > 16
            b0 = c0 // 16 * kt_n * 1024  # the chunk's first B tile (bytes)
            b1 = b0 + kt_n * 1024
            zero_accumulators(two)
            for kt in range(kt_n):
                if c0 == 0 and t + PREFETCH_TILES < t1:
                    for i in range(16):
                        prefetch_l2(flat, ahead + i * k + kt * K_TILE)
                tile_load(4, flat, n0 * k + kt * K_TILE, k)
                tile_load(5, hi_f, b0 + kt * 1024, 64)
                tile_dp_bssd(0, 4, 5)
                tile_load(6, lo_f, b0 + kt * 1024, 64)
                tile_dp_bsud(1, 4, 6)
                if two:
                    tile_load(7, hi_f, b1 + kt * 1024, 64)
                    tile_dp_bssd(2, 4, 7)
                    tile_load(5, lo_f, b1 + kt * 1024, 64)
                    tile_dp_bsud(3, 4, 5)
            tile_store(0, acc, 0, 64)
            tile_store(1, acc, 256, 64)
            _store_tile(acc, s_pad, c0, scale, n0, out, n, min(16, m - c0), streaming, screen)
            if two:
                tile_store(2, acc, 0, 64)
                tile_store(3, acc, 256, 64)
                _store_tile(acc, s_pad, c0 + 16, scale, n0, out, n, m - c0 - 16, streaming, screen)
    if streaming:
        _store_fence()
    tile_release()


def screen_arrays(m: int, n: int, valid: int, err_norm: np.ndarray, w_norm: np.ndarray, x_n: np.ndarray,
                act_n: np.ndarray) -> tuple:
    """``int8_head_amx``'s ``screen`` for ``m`` rows of an ``[n, k]`` head: ``(valid, err_norm, w_norm,
    x_n, act_n, lows, highs)`` with the row norms padded to whole 16-row tiles and ``lows``, ``highs``
    ``[n / 16, rows]``: ``lows.T[:m]``, ``highs.T[:m]`` are ``q8_0_rescore_screened``'s (chunks of 16).
    ``valid = 0`` bounds nothing (every chunk -inf)."""
    rows = -(-m // 16) * 16
    x_pad, act_pad = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    x_pad[:m], act_pad[:m] = x_n, act_n
    lows, highs = (np.empty((n // SCREEN_COLS, rows), np.float32) for _ in range(2))
    return (valid, err_norm, w_norm, x_pad, act_pad, lows, highs)


def screen_bounds(screen: tuple, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lows, highs)`` of ``screen`` after ``int8_head_amx`` as ``[m, n / SCREEN_COLS]`` views, row
    by row: ``q8_0_rescore_screened``'s."""
    return screen[5].T[:m], screen[6].T[:m]


@njit(cache=True, parallel=True)
def int8_head_amx(xq: np.ndarray, s: np.ndarray, qw: np.ndarray, scale: np.ndarray, out: np.ndarray,
                  cfg: np.ndarray, n_threads: int, screen: tuple) -> None:
    """``out [M, N] = s[:, None] * (xq @ qw^T) * scale`` (float32): ``xq`` int16 ``[M, K]`` with
    ``|xq| <= int8_gemv.xq_limit(K)``, ``s`` float32 ``[M]``, ``qw`` int8 ``[N, K]``, ``scale``
    float32 ``[N]`` (``supports(N, K)``); ``cfg`` from ``amx.make_config()``. ``screen`` (``screen_arrays``)
    also takes each 16 columns' bounds as they are stored, so the re-scoring after reads back only
    the chunks that can hold a row's maximum (``q8_0_rescore_screened``) where ``q8_0_rescore``
    bounded all 49k logits of a row again: the pass was ~0.6 of a 32-row greedy step's 2.7 ms."""
    m = xq.shape[0]
    hi, lo = split_activations(xq)
    s_pad = np.zeros(hi.shape[0] * 16 + 16, np.float32)
    s_pad[:m] = s
    n_tiles = out.shape[1] // 16
    workers = max(1, min(n_threads, n_tiles))
    for w in prange(workers):
        _weight_tiles(qw, hi, lo, s_pad, scale, out, m, cfg, w * n_tiles // workers, (w + 1) * n_tiles // workers,
                      screen)
