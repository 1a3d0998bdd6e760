"""Rotary position tables, with the per-model scalings (linear, llama3)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ROPE_ROWS = 8192  # positions whose cos and sin are taken in float64 at a time


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


def cos_sin_table(head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``[max_positions, head_dim]``: cos of each frequency in the first half, sin in the second.

    The angles are float32 products, as transformers makes them; their cos and sin are taken in
    float64 by numpy on one thread and rounded once. (torch's float32 ``cos`` splits a table this
    big among threads, and the elements where a thread's range starts or ends take the scalar
    tail instead of the vector body, a last bit apart: with another process busy, 1 process in ~15
    got a different table, and then different answers.)"""
    inv_freq = inv_frequencies(head_dim, theta, scaling).numpy()
    half = inv_freq.shape[0]
    table = np.empty((max_positions, 2 * half), np.float32)
    for p0 in range(0, max_positions, ROPE_ROWS):  # float64 a slice at a time (a 128k context: 4 MB, not 130)
        pos = np.arange(p0, min(max_positions, p0 + ROPE_ROWS), dtype=np.float32)
        freqs = np.outer(pos, inv_freq).astype(np.float64)
        table[p0:p0 + pos.shape[0], :half] = np.cos(freqs)
        table[p0:p0 + pos.shape[0], half:] = np.sin(freqs)
    return torch.from_numpy(table).to(device)
