"""The int8 K/V cache format in torch: per-row int8 codes with the row's float32 scale appended.

A row of ``D`` values becomes ``D + 4`` int8s: ``round(x / s)`` clamped to ``[-127, 127]`` with
``s = max|x| / 127``, then ``s``'s four bytes. The CPU kernels (``kernels/cpu/kv_int8.py``) read and
write the same layout in place; these functions are the reference and serve gathers outside them.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4
QMAX = 127


def row_elements(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` one (token, kv head) row of K or V takes: an int8 row carries its scale."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def row_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one (token, kv head) row of K or V takes in a cache of ``dtype``."""
    return row_elements(head_dim, dtype) * dtype.itemsize


def quantize_kv_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` (any float dtype) as int8 cache rows ``[..., D + 4]``."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scale = amax / QMAX
    # a true division: ``QMAX / amax`` with a Python number is ``amax.reciprocal() * QMAX`` in torch,
    # which rounds twice and moves a code by one now and then against the kernels' quantization
    inv = torch.where(amax > 0, torch.full_like(amax, QMAX) / amax, torch.zeros_like(amax))
    codes = torch.round(xf * inv).clamp_(-QMAX, QMAX).to(torch.int8)
    return torch.cat([codes, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_kv_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 cache rows ``[..., D + 4]`` back to values ``[..., D]`` (float32 math, then ``dtype``)."""
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (rows[..., :-SCALE_BYTES].float() * scale).to(dtype)
