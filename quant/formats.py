"""GGML block formats as data: layout facts and exact dequantization (the reference every kernel meets).

Each format stores a row of K weights as K/32 blocks. Layouts (little endian):
- Q8_0: f16 d, 32 x int8 q                 -> w = d * q
- Q4_0: f16 d, 16 bytes of nibbles         -> w = d * (q - 8)
- Q4_1: f16 d, f16 m, 16 bytes of nibbles  -> w = d * q + m
Nibbles: byte j holds element j in its low half and element j + 16 in its high half.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block_elems: int
    block_bytes: int


FORMATS = {
    "Q8_0": BlockFormat("Q8_0", 32, 34),
    "Q4_0": BlockFormat("Q4_0", 32, 18),
    "Q4_1": BlockFormat("Q4_1", 32, 20),
}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Reinterpret the last dim of uint8 pairs as float16 -> float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    lo = qs & 0x0F
    hi = qs >> 4
    return torch.cat([lo, hi], dim=-1).to(torch.int16)


def split_blocks(fmt: str, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the fields of blocks ``data[..., nblocks, block_bytes]`` (uint8) as float/int tensors."""
    if fmt == "Q8_0":
        return {"d": _f16(data[..., 0:2]), "q": data[..., 2:34].contiguous().view(torch.int8)}
    if fmt == "Q4_0":
        return {"d": _f16(data[..., 0:2]), "q": _nibbles(data[..., 2:18])}
    if fmt == "Q4_1":
        return {"d": _f16(data[..., 0:2]), "m": _f16(data[..., 2:4]), "q": _nibbles(data[..., 4:20])}
    raise ValueError(f"unknown block format {fmt}")


def dequantize_blocks(fmt: str, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize uint8 ``data[rows, nbytes]`` of ``fmt`` to ``dtype[rows, K]``."""
    spec = FORMATS[fmt]
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, spec.block_bytes)
    f = split_blocks(fmt, blocks)
    q = f["q"].float()
    if fmt == "Q8_0":
        w = f["d"] * q
    elif fmt == "Q4_0":
        w = f["d"] * (q - 8)
    else:
        w = f["d"] * q + f["m"]
    return w.reshape(rows, -1).to(dtype)


def quantize_rows(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """Quantize a float ``w[rows, K]`` (K % 32 == 0) to uint8 blocks; used by tests and offline tools."""
    rows, k = w.shape
    if k % 32:
        raise ValueError(f"row length {k} is not a multiple of 32")
    b = w.float().reshape(rows, k // 32, 32)
    if fmt == "Q8_0":
        amax = b.abs().amax(-1, keepdim=True)
        d = (amax / 127).to(torch.float16)
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d.float()))
        q = torch.round(b * inv).clamp(-128, 127).to(torch.int8)
        out = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1)
    elif fmt == "Q4_0":
        idx = b.abs().argmax(-1, keepdim=True)
        mx = torch.gather(b, -1, idx)
        d = (mx / -8).to(torch.float16)
        inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(d.float()))
        q = torch.clamp(torch.round(b * inv + 8), 0, 15).to(torch.uint8)
        out = torch.cat([d.view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    elif fmt == "Q4_1":
        mn, mx = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = ((mx - mn) / 15).to(torch.float16)
        m = mn.to(torch.float16)
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d.float()))
        q = torch.clamp(torch.round((b - m.float()) * inv), 0, 15).to(torch.uint8)
        out = torch.cat([d.view(torch.uint8), m.view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    else:
        raise ValueError(f"unknown block format {fmt}")
    return out.reshape(rows, -1).contiguous()
