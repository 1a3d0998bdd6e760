"""Expand packed weights to bfloat16 for the AMX/AVX-512-BF16 GEMMs of batched steps.

A step with many rows (a prefill chunk, a large decode batch) is cheapest as one oneDNN bf16 GEMM:
ATen's int4 kernel costs a roughly fixed time per row, while the GEMM (AMX or AVX512-BF16) barely
grows with the row count. The dense bf16 weight is not kept (weights stay packed in memory): it is
expanded each step into a scratch buffer shared by all weights of one shape. Expansion plus GEMM
beats the int4 kernel past about 32 rows in a real step (7x at 512 rows). bfloat16 values are handled
as their uint16 bits (Numba has no bf16 type) and rounded to nearest even from float32.

Example::

    out = np.empty((k, n), np.uint16)                       # W^T as bf16 bits
    int4pack_to_bf16_t(packed, scale_zeros_bits, 32, out)  # packed: ATen's CPU int4pack layout
    y = torch.mm(x_bf16, torch.from_numpy(out).view(torch.bfloat16))
"""
from __future__ import annotations

import numba
import numpy as np

from edgellm.kernels.cpu.paged_attention import FASTMATH

BLOCK_N = 64  # rows per ATen int4pack block


@numba.njit(inline="always")
def _round_to_bf16(bits: np.uint32) -> np.uint16:
    """Round to nearest even without ``bf16.round_bits``' NaN select: weights are finite, and the
    select made the expansion 1.2-1.4x slower."""
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def int4pack_to_bf16_t(packed: np.ndarray, scale_zeros: np.ndarray, group: int, out_t: np.ndarray,
                       chunks: int) -> None:
    """``out_t[k, n] = bf16((q[n, k] - 8) * scale + zero)``.

    ``packed`` uint8 [N/64, K, 32] (row ``j`` in the low nibble, row ``j + 32`` in the high one);
    ``scale_zeros`` uint16 [K/group, N, 2], the bf16 bits of (scale, zero); ``out_t`` uint16 [K, N].
    Work is dealt out as (64-row block, group) tiles in a few contiguous chunks per thread, so even a
    192-row weight keeps both threads busy and each chunk allocates its buffers once.
    """
    nblocks, k_dim, _ = packed.shape
    ngroups = k_dim // group
    tiles = nblocks * ngroups
    chunks = max(1, min(tiles, chunks))
    for c in numba.prange(chunks):
        tmp = np.empty(BLOCK_N, np.float32)
        tmp_bits = tmp.view(np.uint32)
        sz_bits = np.empty(2 * BLOCK_N, np.uint32)
        sz = sz_bits.view(np.float32)  # [0, 64): scale; [64, 128): zero - 8 * scale
        for tile in range(c * tiles // chunks, (c + 1) * tiles // chunks):
            nb = tile // ngroups
            g = tile - nb * ngroups
            row0 = nb * BLOCK_N
            for j in range(BLOCK_N):
                sz_bits[j] = np.uint32(scale_zeros[g, row0 + j, 0]) << np.uint32(16)
                sz_bits[BLOCK_N + j] = np.uint32(scale_zeros[g, row0 + j, 1]) << np.uint32(16)
            for j in range(BLOCK_N):
                sz[BLOCK_N + j] -= np.float32(8.0) * sz[j]
            for kk in range(g * group, g * group + group):
                p = packed[nb, kk]
                for j in range(32):  # separate low and high loops: each vectorizes on its own
                    tmp[j] = np.float32(p[j] & np.uint8(15)) * sz[j] + sz[BLOCK_N + j]
                for j in range(32):
                    tmp[j + 32] = np.float32(p[j] >> np.uint8(4)) * sz[j + 32] + sz[BLOCK_N + 32 + j]
                o = out_t[kk, row0:row0 + BLOCK_N]
                for j in range(BLOCK_N):
                    o[j] = _round_to_bf16(tmp_bits[j])
