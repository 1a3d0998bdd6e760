"""The bf16 expansion kernels against dequantize-then-round in torch."""
from __future__ import annotations

import pytest
import torch

from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows


def quantized(fmt: str, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :32] = 0.0
    return QuantizedTensor(fmt, quantize_rows(fmt, w), (n, k))



def assert_matches_expanded_gemm(got: torch.Tensor, x: torch.Tensor, w: Int4PackedWeight) -> None:
    """``got`` (an int4 kernel's bf16 output) against ``x @`` the bf16 expansion of ``w``: float32
    accumulation in another order, then one bf16 rounding of the result."""
    want = x.double() @ w.expand_f32_t().bfloat16().double()
    tol = 2.0 ** -8 * want.abs() + 1e-5 * (x.double().abs() @ w.expand_f32_t().double().abs())
    assert ((got.double() - want).abs() <= tol).all()

@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n, k", [(64, 32), (192, 576), (576, 1536)])
def test_int4pack_to_bf16_matches_the_exact_float32_expansion_rounded(fmt, n, k):
    w = Int4PackedWeight.from_quantized(quantized(fmt, n, k))
    got = w.expand_bf16_t().float()
    want = w.expand_f32_t().bfloat16().float()  # exact fp32 value, then round to nearest even
    assert got.shape == (k, n)
    # a fused multiply-add may round the float32 value differently by one ulp before the bf16 rounding
    ulp = want.abs().clamp_min(1e-30) * 2.0 ** -7
    assert ((got - want).abs() <= ulp).all()
    assert (got != want).float().mean() < 1e-3
