"""Fused row-wise kernels for the small per-layer ops of a decode step.

A decode step of a small model is dominated by per-op dispatch, not arithmetic: the reference
residual-add + RMSNorm is ~8 ATen ops and the rotary embedding ~15, for every layer. One Numba call
each does the same work. Rows are processed independently with a fixed summation order, so a row's
result never depends on the batch around it.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=False)
def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray,
                 has_residual: bool) -> None:
    """``residual = x + residual`` (or ``x``) in place; ``out = residual * rsqrt(mean(residual^2) + eps) * w``."""
    rows, dim = x.shape
    for r in range(rows):
        acc = 0.0
        for j in range(dim):
            v = x[r, j] + residual[r, j] if has_residual else x[r, j]
            residual[r, j] = v
            acc += np.float64(v) * np.float64(v)
        inv = np.float32(1.0 / np.sqrt(acc / dim + eps))
        for j in range(dim):
            out[r, j] = np.float32(residual[r, j] * inv) * weight[j]


@numba.njit(cache=True)
def rope_neox(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` in place, half-split (NeoX/HF) layout."""
    t_len, n_q, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    for t in range(t_len):
        p = positions[t]
        for h in range(n_q + n_k):
            for i in range(half):
                c = cos_sin[p, i]
                s = cos_sin[p, half + i]
                if h < n_q:
                    x1 = q[t, h, i]
                    x2 = q[t, h, half + i]
                    q[t, h, i] = x1 * c - x2 * s
                    q[t, h, half + i] = x2 * c + x1 * s
                else:
                    x1 = k[t, h - n_q, i]
                    x2 = k[t, h - n_q, half + i]
                    k[t, h - n_q, i] = x1 * c - x2 * s
                    k[t, h - n_q, half + i] = x2 * c + x1 * s
