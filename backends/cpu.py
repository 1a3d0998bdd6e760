"""The CPU backend: packed int4 weights through ATen's CPU int4 kernel, Numba kernels for the rest."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from edgellm.backends.base import Capabilities
from edgellm.backends.torch_ref import TorchBackend
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import split_blocks

logger = logging.getLogger(__name__)


@dataclass
class Int4PackedWeight:
    """Q4_0/Q4_1 repacked once for ``aten._weight_int4pack_mm_for_cpu`` (groups of 32 = GGML blocks).

    GGML gives w = d*q + m (Q4_1) or d*(q-8) (Q4_0); the kernel computes (q-8)*scale + zero, so
    scale = d and zero = m + 8d (Q4_1) or 0 (Q4_0): exact, no requantization.
    """

    packed: torch.Tensor
    scale_zeros: torch.Tensor  # [K/32, N, 2]
    shape: tuple[int, int]

    @classmethod
    def from_quantized(cls, w: QuantizedTensor, dtype: torch.dtype) -> "Int4PackedWeight":
        n, k = w.shape
        f = split_blocks(w.fmt, w.data.reshape(n, k // 32, -1))
        q = f["q"].reshape(n, k).to(torch.int32)
        d = f["d"].squeeze(-1)  # [N, K/32]
        zero = f["m"].squeeze(-1) + 8 * d if w.fmt == "Q4_1" else torch.zeros_like(d)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([d.t(), zero.t()], dim=-1).to(dtype).contiguous()
        return cls(packed, sz, (n, k))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zeros.numel() * 4


class CPUBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device="cpu", threads: int | None = None) -> None:
        super().__init__(device, threads)
        threads = threads or int(os.environ.get("EDGELLM_THREADS", 0)) or default_threads()
        torch.set_num_threads(threads)
        self.threads = threads

    def capabilities(self) -> Capabilities:
        return Capabilities(
            name=self.name,
            device="cpu",
            dtypes=(torch.float32, torch.bfloat16),
            default_dtype=torch.float32,
            kv_cache_bytes_available=int(psutil.virtual_memory().available),
            native_quant_formats=("Q4_0", "Q4_1", "Q8_0"),
            notes={"isa": torch.backends.cpu.get_cpu_capability(), "threads": self.threads},
        )

    def prepare_weight(self, weight: Any, dtype: torch.dtype) -> Any:
        if isinstance(weight, QuantizedTensor) and weight.fmt in ("Q4_0", "Q4_1"):
            return Int4PackedWeight.from_quantized(weight, dtype)
        return super().prepare_weight(weight, dtype)

    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, Int4PackedWeight):
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, x.shape[-1]).to(weight.scale_zeros.dtype).contiguous(),
                weight.packed, 32, weight.scale_zeros,
            ).to(x.dtype)
            y = y.reshape(*lead, -1)
            return y if bias is None else y + bias
        return super().linear(x, weight, bias)


def default_threads() -> int:
    """Physical cores available to this process: hyperthreads slow memory-bound decode down."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


__all__ = ["CPUBackend", "Int4PackedWeight", "F"]
