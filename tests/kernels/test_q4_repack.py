"""``q4_blocks_to_int4pack`` against ATen's own packing of the same nibbles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.kernels.cpu.q4_repack import q4_blocks_to_int4pack
from edgellm.quant import QuantizedTensor


def aten_pack(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The reference: nibbles in element order, packed by ``_convert_weight_to_int4pack_for_cpu``."""
    qs = blocks[..., -16:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


@pytest.mark.parametrize("spec", [18, 20])
@pytest.mark.parametrize("n,k", [(64, 32), (128, 64), (192, 576), (576, 1536)])
def test_matches_aten_packing(spec: int, n: int, k: int) -> None:
    rng = np.random.default_rng(n + k + spec)
    blocks = torch.from_numpy(rng.integers(0, 256, (n, k // 32, spec), dtype=np.uint8))
    packed = np.empty((n // 64, k, 32), np.uint8)
    q4_blocks_to_int4pack(blocks.numpy(), packed)
    assert np.array_equal(packed.reshape(n, k // 2), aten_pack(blocks, n, k).numpy())


@pytest.mark.parametrize("fmt,spec", [("Q4_0", 18), ("Q4_1", 20)])
def test_weight_dequantizes_exactly(fmt: str, spec: int) -> None:
    """The repacked weight, expanded by ATen's own kernel, equals the GGML blocks' values."""
    n, k = 128, 96
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (n, k // 32, spec), dtype=np.uint8)
    # scales and minima that bf16 holds exactly, so every product is exact
    raw[..., 0:2] = np.array([2.0**-7], np.float16).view(np.uint8)
    if spec == 20:
        raw[..., 2:4] = np.array([-0.25], np.float16).view(np.uint8)
    qt = QuantizedTensor(fmt, torch.from_numpy(raw.reshape(n, -1)), (n, k))
    w = Int4PackedWeight.from_quantized(qt)
    eye = torch.eye(k, dtype=torch.bfloat16)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w.packed, 32, w.scale_zeros).float().t()
    assert torch.equal(got, qt.dequantize().to(torch.bfloat16).float())
