"""GGML Q4_0/Q4_1 blocks to ATen's CPU int4-packed layout, once at load.

A GGML block holds 32 weights of one row: its scale (and Q4_1's minimum) as float16, then 16 bytes
whose low nibbles are weights 0-15 and high nibbles weights 16-31. ATen's layout
(``_convert_weight_to_int4pack_for_cpu(q, 1)``) is ``[N/64, K, 32]`` bytes: byte ``j`` of a (row
block, column) holds row ``j`` in its low nibble and row ``j + 32`` in its high nibble. Moving the
nibbles with torch ops (split, concatenate, transpose, copy) took ~0.2 s of start-up for SmolLM2's
66 MB of weights on 2 cores; this kernel makes one parallel pass over 64-row x 32-column tiles.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def q4_blocks_to_int4pack(blocks: np.ndarray, packed: np.ndarray) -> None:
    """``blocks`` uint8 ``[N, K/32, spec]`` (the 16 quant bytes last), ``N % 64 == 0``; writes
    ``packed`` uint8 ``[N/64, K, 32]``."""
    n, kb, spec = blocks.shape
    first = spec - 16
    for t in numba.prange(n // 64 * kb):
        nb, c = t // kb, t % kb
        r0 = nb * 64
        for i in range(16):
            for j in range(32):
                lo = blocks[r0 + j, c, first + i]
                hi = blocks[r0 + 32 + j, c, first + i]
                packed[nb, c * 32 + i, j] = (lo & 15) | ((hi & 15) << 4)
                packed[nb, c * 32 + 16 + i, j] = (lo >> 4) | (hi & 240)
