"""Per-row int8 weights (an output head's int8 copy) times bf16 rows on AMX tiles.

``out [M, N] = (x [M, K] @ qw [N, K]^T) * scale [N]``: the semantics of ATen's
``_weight_int8pack_mm``, whose cost grows with every row. Here the weight is the tiles' A operand,
so its rows are widened straight from memory (int8 values are exact in bf16) and each 32-row panel
is widened once per call; the activations, transposed once into VNNI pairs, are the B operand. The
products are exact and accumulate in float32; the result is float32, scaled once.

Example::

    out = np.empty((m, n), np.float32)
    int8_amx_matmul(x_bf16_bits, qw, scale_f32, out, amx.make_config(), n_threads=2)
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

GROUP = 32  # k per tile product
PANEL = 32  # weight rows per pass: two A tiles
CHUNK = 32  # activation rows per pass: two B tiles


@intrinsic
def widen_int8_32(typingctx, src, src_index, dst, dst_index):
    """``dst.flat[dst_index + i] = bf16(src.flat[src_index + i])`` for 32 int8 values (exact)."""
    if not (isinstance(src, types.Array) and src.dtype == types.int8 and src.layout == "C"
            and isinstance(dst, types.Array) and dst.dtype == types.uint16 and dst.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        def half(offset):  # 16 int8 values as floats
            ptr = element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                              ir.VectorType(ir.IntType(8), 16), offset)
            return builder.sitofp(builder.load(ptr, align=1), ir.VectorType(ir.FloatType(), 16))

        lo, hi = half(0), half(16)
        out = builder.call(cvt_ne2ps2bf16(builder), [hi, lo])
        builder.store(out, element_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3], out.type), align=2)
        return context.get_dummy_value()

    return types.void(src, src_index, dst, dst_index), codegen


@njit(cache=True, inline="always")
def _widen_group(qw, n0, g, a):
    """Rows ``n0:n0+32``, columns ``32 g : 32 g + 32`` of ``qw`` as two bf16 A tiles in ``a [32, 32]``."""
    k = qw.shape[1]
    for i in range(PANEL):
        widen_int8_32(qw, (n0 + i) * k + g * GROUP, a, i * GROUP)


@njit(cache=True)
def _panels(xt, qw, scale, out, m, cfg, p0, p1):
    """Output columns ``32 p0 : 32 p1`` of ``out [m, N]``."""
    k = qw.shape[1]
    mp = xt.shape[1]  # rows padded to whole B tiles
    groups = k // GROUP
    a = np.empty((groups, PANEL, GROUP), np.uint16)
    cbuf = np.empty((PANEL, CHUNK), np.float32)
    tile_config(cfg)
    for p in range(p0, p1):
        n0 = p * PANEL
        for g in range(groups if m > CHUNK else 0):
            _widen_group(qw, n0, g, a[g])
        for r0 in range(0, m, CHUNK):
            two = m - r0 > 16
            zero_accumulators(two)
            for g in range(groups):
                if m <= CHUNK:
                    _widen_group(qw, n0, g, a[g])
                tile_load(4, a, g * PANEL * GROUP, 64)
                tile_load(5, a, g * PANEL * GROUP + 16 * GROUP, 64)
                tile_load(6, xt, g * 16 * mp + r0, 4 * mp)
                tile_dp_bf16(0, 4, 6)
                tile_dp_bf16(1, 5, 6)
                if two:
                    tile_load(7, xt, g * 16 * mp + r0 + 16, 4 * mp)
                    tile_dp_bf16(2, 4, 7)
                    tile_dp_bf16(3, 5, 7)
            tile_store(0, cbuf, 0, 128)  # cbuf [weight row, activation row]
            tile_store(1, cbuf, 16 * CHUNK, 128)
            if two:
                tile_store(2, cbuf, 16, 128)
                tile_store(3, cbuf, 16 * CHUNK + 16, 128)
            for r in range(min(CHUNK, m - r0)):
                for i in range(PANEL):
                    out[r0 + r, n0 + i] = cbuf[i, r] * scale[n0 + i]
    tile_release()


@njit(cache=True)
def vnni_transpose(x):
    """``xt [K/2, M padded to 16]``: ``xt[r, m]`` is the bf16 pair ``x[m, 2r], x[m, 2r + 1]``."""
    m, k = x.shape
    x32 = x.view(np.uint32) if x.flags.c_contiguous else np.ascontiguousarray(x).view(np.uint32)
    xt = np.zeros((k // 2, -(-m // 16) * 16), np.uint32)
    for i in range(m):
        for r in range(k // 2):
            xt[r, i] = x32[i, r]
    return xt


@njit(cache=True, parallel=True)
def int8_amx_matmul(x: np.ndarray, qw: np.ndarray, scale: np.ndarray, out: np.ndarray, cfg: np.ndarray,
                    n_threads: int) -> None:
    """``out [M, N] = (x @ qw^T) * scale``; ``x`` bf16 bits (uint16), ``qw`` int8 ``[N, K]``, ``scale``
    float32 ``[N]``, ``N % 32 == 0``, ``K % 32 == 0``; ``cfg`` from ``amx.make_config()``."""
    xt = vnni_transpose(x)
    n_panels = out.shape[1] // PANEL
    workers = max(1, min(n_threads, n_panels))
    for w in prange(workers):
        _panels(xt, qw, scale, out, x.shape[0], cfg, w * n_panels // workers, (w + 1) * n_panels // workers)
