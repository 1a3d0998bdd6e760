"""A weight kept in its quantized storage format; backends decide how to multiply by it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.quant.formats import FORMATS, dequantize_blocks


@dataclass
class QuantizedTensor:
    """A 2-D weight ``[rows, cols]`` stored as GGML blocks along ``cols``.

    ``data`` is uint8 ``[rows, cols // 32 * block_bytes]``. Row operations (select, concatenate,
    permute) act on whole rows, so they never touch the block contents.
    """

    fmt: str
    data: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        spec = FORMATS[self.fmt]
        rows, cols = self.shape
        if cols % spec.block_elems:
            raise ValueError(f"{self.fmt}: row length {cols} is not a multiple of {spec.block_elems}")
        want = (rows, cols // spec.block_elems * spec.block_bytes)
        if tuple(self.data.shape) != want:
            raise ValueError(f"{self.fmt} data has shape {tuple(self.data.shape)}, expected {want}")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.fmt, self.data, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize only the selected rows (an embedding lookup)."""
        return dequantize_blocks(self.fmt, self.data[index.reshape(-1)], dtype).reshape(*index.shape, -1)

    def permute_rows(self, perm: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(self.fmt, self.data[perm].contiguous(), self.shape)

    @staticmethod
    def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
        fmt, cols = parts[0].fmt, parts[0].shape[1]
        if any(p.fmt != fmt or p.shape[1] != cols for p in parts):
            raise ValueError("can only concatenate rows of one format and width")
        data = torch.cat([p.data for p in parts], dim=0)
        return QuantizedTensor(fmt, data, (data.shape[0], cols))


def cat_rows(parts: list) -> torch.Tensor | QuantizedTensor:
    """Concatenate weights along the output dimension, dense or quantized alike."""
    if all(isinstance(p, QuantizedTensor) for p in parts):
        return QuantizedTensor.cat_rows(parts)
    return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts], dim=0)


def permute_rows(w: torch.Tensor | QuantizedTensor, perm: torch.Tensor):
    return w.permute_rows(perm) if isinstance(w, QuantizedTensor) else w[perm].contiguous()
