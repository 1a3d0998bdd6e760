"""Fused row-wise kernels for the small per-layer ops of a decode step.

A decode step of a small model is dominated by per-op dispatch, not arithmetic: the reference
residual-add + RMSNorm is ~8 ATen ops and the rotary embedding ~15, for every layer. One Numba call
each does the same work. Rows are processed independently with a fixed summation order, so a row's
result never depends on the batch around it.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from edgellm.kernels.cpu.bf16 import load_row, store_row


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_squares(row: np.ndarray) -> float:
    """Sum of ``row``'s squares in float64, in vector partial sums: an order fixed by this compiled
    code, the same for a row whatever batch it is in (a sequential sum stalls on each add)."""
    acc = 0.0
    for j in range(row.shape[0]):
        acc += np.float64(row[j]) * np.float64(row[j])
    return acc


@numba.njit(cache=True, fastmath=False)
def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray,
                 has_residual: bool) -> None:
    """``residual = x + residual`` (or ``x``) in place; ``out = residual * rsqrt(mean(residual^2) + eps) * w``.

    ``x`` and ``out`` may be float32 or bf16 bits (uint16); ``residual`` is float32.
    """
    rows, dim = x.shape
    wide = np.empty(dim, np.uint32)
    normed = np.empty(dim, np.float32)
    for r in range(rows):
        xr = load_row(x[r], wide)
        for j in range(dim):
            residual[r, j] = xr[j] + residual[r, j] if has_residual else xr[j]
        inv = np.float32(1.0 / np.sqrt(_sum_squares(residual[r]) / dim + eps))
        for j in range(dim):
            normed[j] = np.float32(residual[r, j] * inv) * weight[j]
        store_row(out[r], normed)


@numba.njit(cache=True)
def rope_neox(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, q_out: np.ndarray,
              k_out: np.ndarray) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` into float32 ``q_out``, ``k_out``, half-split
    (NeoX/HF) layout. Inputs may be float32 (``q_out`` may be ``q``: in place) or bf16 bits."""
    t_len, n_q, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    wide = np.empty(dim, np.uint32)
    for t in range(t_len):
        p = positions[t]
        for h in range(n_q + n_k):
            src = load_row(q[t, h], wide) if h < n_q else load_row(k[t, h - n_q], wide)
            dst = q_out[t, h] if h < n_q else k_out[t, h - n_q]
            for i in range(half):
                c = cos_sin[p, i]
                s = cos_sin[p, half + i]
                x1 = src[i]
                x2 = src[half + i]
                dst[i] = x1 * c - x2 * s
                dst[half + i] = x2 * c + x1 * s


@numba.njit(cache=True, parallel=True)
def add_rms_norm_parallel(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray,
                          has_residual: bool, n_threads: int) -> None:
    """``add_rms_norm`` with the rows split into ``n_threads`` ranges (each row's numbers unchanged)."""
    rows = x.shape[0]
    for w in prange(n_threads):
        r0, r1 = w * rows // n_threads, (w + 1) * rows // n_threads
        add_rms_norm(x[r0:r1], residual[r0:r1], weight, eps, out[r0:r1], has_residual)


@numba.njit(cache=True, parallel=True)
def rope_neox_parallel(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, q_out: np.ndarray,
                       k_out: np.ndarray, n_threads: int) -> None:
    """``rope_neox`` with the tokens split into ``n_threads`` ranges."""
    rows = q.shape[0]
    for w in prange(n_threads):
        r0, r1 = w * rows // n_threads, (w + 1) * rows // n_threads
        rope_neox(q[r0:r1], k[r0:r1], positions[r0:r1], cos_sin, q_out[r0:r1], k_out[r0:r1])
