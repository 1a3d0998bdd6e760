"""Expand ATen's CPU int4-packed weights to exact float32: the prompt path of batch-invariant mode.

``aten._weight_int4pack_mm_for_cpu`` is the fastest kernel for a few rows of activations, but its cost
grows with every row. Its arithmetic is exactly "dequantize in fp32, accumulate in fp32, round the
output to bf16". In batch-invariant mode, prompt tokens therefore use an exact fp32 expansion of the
packed weight in a reused scratch buffer, a BLAS GEMM in fixed tiles, and the same rounding. A
sequence then gets the same numbers alone or in a big batch (up to summation order), and no second,
dense copy of the weights is kept. The default mode's faster bf16 path is ``bf16_expand.py``.

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
def int4pack_to_f32_t(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int,
                      out_t: np.ndarray) -> None:
    """``packed`` uint8 [N/64, K, 32]; ``scales``, ``zeros`` float32 [K/group, N]; ``out_t`` float32 [K, N]."""
    nblocks, k_dim, _ = packed.shape
    for nb in numba.prange(nblocks):
        row0 = nb * BLOCK_N
        for kk in range(k_dim):
            g = kk // group
            for j in range(32):
                byte = np.int32(packed[nb, kk, j])
                out_t[kk, row0 + j] = np.float32((byte & 15) - 8) * scales[g, row0 + j] + zeros[g, row0 + j]
                out_t[kk, row0 + j + 32] = (np.float32((byte >> 4) - 8) * scales[g, row0 + j + 32]
                                            + zeros[g, row0 + j + 32])
