"""Expand packed weights to bfloat16 for the AMX/AVX-512-BF16 GEMMs of batched steps.

A step with many rows (a prefill chunk, a large decode batch) is cheapest as one oneDNN bf16 GEMM:
on CPUs with AMX or AVX512-BF16 it runs 4-10x faster than ATen's int4 kernel once there are more
than ~16 rows. The dense bf16 weight is not kept (weights stay packed in memory): it is expanded each
step into a scratch buffer shared by all weights of one shape, which costs far less than the GEMM it
enables. bfloat16 values are handled as their uint16 bits (Numba has no bf16 type) and rounded to
nearest even from float32.

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
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def int4pack_to_bf16_t(packed: np.ndarray, scale_zeros: np.ndarray, group: int, out_t: np.ndarray) -> None:
    """``out_t[k, n] = bf16((q[n, k] - 8) * scale + zero)``.

    ``packed`` uint8 [N/64, K, 32] (row ``j`` in the low nibble, row ``j + 32`` in the high one);
    ``scale_zeros`` uint16 [K/group, N, 2], the bf16 bits of (scale, zero); ``out_t`` uint16 [K, N].
    """
    nblocks, k_dim, _ = packed.shape
    for nb in numba.prange(nblocks):
        row0 = nb * BLOCK_N
        sz_bits = np.empty(2 * BLOCK_N, np.uint32)
        sz = sz_bits.view(np.float32)  # [0, 64): scale; [64, 128): zero - 8 * scale
        tmp = np.empty(BLOCK_N, np.float32)
        tmp_bits = tmp.view(np.uint32)
        for kk in range(k_dim):
            if kk % group == 0:
                g = kk // group
                for j in range(BLOCK_N):
                    sz_bits[j] = np.uint32(scale_zeros[g, row0 + j, 0]) << np.uint32(16)
                    sz_bits[BLOCK_N + j] = np.uint32(scale_zeros[g, row0 + j, 1]) << np.uint32(16)
                for j in range(BLOCK_N):
                    sz[BLOCK_N + j] -= np.float32(8.0) * sz[j]
            p = packed[nb, kk]
            for j in range(32):
                b = p[j]
                tmp[j] = np.float32(b & np.uint8(15)) * sz[j] + sz[BLOCK_N + j]
                tmp[j + 32] = np.float32(b >> np.uint8(4)) * sz[j + 32] + sz[BLOCK_N + j + 32]
            o = out_t[kk, row0:row0 + BLOCK_N]
            for j in range(BLOCK_N):
                o[j] = _round_to_bf16(tmp_bits[j])


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def q8_0_to_bf16(qs: np.ndarray, d: np.ndarray, n0: int, out: np.ndarray) -> None:
    """``out[i] = bf16(d[n0 + i] * qs[n0 + i])``: rows ``n0..`` of a repacked Q8_0 weight as bf16 bits."""
    k = qs.shape[1]
    qk = k // d.shape[1]
    for i in numba.prange(out.shape[0]):
        tmp = np.empty(k, np.float32)
        bits = tmp.view(np.uint32)
        row = qs[n0 + i]
        for b in range(d.shape[1]):
            scale = d[n0 + i, b]
            for j in range(b * qk, b * qk + qk):
                tmp[j] = np.float32(row[j]) * scale
        o = out[i]
        for j in range(k):
            o[j] = _round_to_bf16(bits[j])
