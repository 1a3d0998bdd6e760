"""Expand ATen's CPU int4-packed weights to bf16 for large-batch matmuls.

``aten._weight_int4pack_mm_for_cpu`` is the fastest kernel for a few rows of activations but slows
sharply past ~16 rows, where oneDNN's bf16 GEMM (AMX/AVX-512) wins. Rather than keep a second, dense
copy of every weight, a large batch expands the packed weight into a reused scratch buffer.

Packed layout (``_convert_weight_to_int4pack_for_cpu(q, 1)``): ``[N/64, K, 32]`` bytes; byte ``j`` of a
(row block, k) holds row ``j`` in its low nibble and row ``j + 32`` in its high nibble. Scales and zeros
are ``[K/group, N, 2]`` and ``w = (q - 8) * scale + zero``. The output is ``W^T`` (``[K, N]``) so the
inner loop writes contiguous memory.
"""
from __future__ import annotations

import numba
import numpy as np

BLOCK_N = 64


@numba.njit(parallel=True, cache=True)
def int4pack_to_bf16_t(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int,
                       out_t: np.ndarray) -> None:
    """``packed`` uint8 [N/64, K, 32]; ``scales``, ``zeros`` float32 [K/group, N];
    ``out_t`` uint16 (bf16 bits) [K, N], rounded to nearest even."""
    nblocks, k_dim, _ = packed.shape
    for nb in numba.prange(nblocks):
        row0 = nb * BLOCK_N
        buf = np.empty(BLOCK_N, dtype=np.float32)
        bits = buf.view(np.uint32)
        for kk in range(k_dim):
            g = kk // group
            for j in range(32):
                byte = np.int32(packed[nb, kk, j])
                buf[j] = np.float32((byte & 15) - 8) * scales[g, row0 + j] + zeros[g, row0 + j]
                buf[j + 32] = np.float32((byte >> 4) - 8) * scales[g, row0 + j + 32] + zeros[g, row0 + j + 32]
            for j in range(BLOCK_N):
                b = bits[j]
                out_t[kk, row0 + j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                                                >> np.uint32(16))
