"""The AVX512-BF16 kernels (CPUs without AMX) against the bf16 expansion and float64, and the
backend's choice of them.

These run where the CPU has AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later); elsewhere
the backend never calls the kernels, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.kernels.cpu.dpbf16 import int4_dpbf16_matmul, int8_dpbf16_matmul, supported
from tests.kernels.int8_head_checks import assert_greedy_head_exact, assert_matches_float64, int8_case
from tests.kernels.test_bf16_expand import assert_matches_expanded_gemm, quantized

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-BF16")


def dp_mm(x: torch.Tensor, w: Int4PackedWeight, threads: int = 2) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    packed, sz = w.amx_operands
    int4_dpbf16_matmul(x.bfloat16().contiguous().view(torch.uint16).numpy(), packed, sz,
                       out.view(torch.uint16).numpy(), threads)
    return out


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n, k", [(64, 32), (192, 576), (960, 576), (576, 1536)])
def test_identity_rows_give_the_expanded_weight_bit_for_bit(fmt, n, k):
    """One-hot rows pick single weights: the kernel's bf16 dequantization must be the expansion's."""
    w = Int4PackedWeight.from_quantized(quantized(fmt, n, k))
    want = w.expand_f32_t().bfloat16()  # [K, N]: exact float32 value rounded to nearest even
    for k0 in range(0, k, 37):  # 37 rows: full register blocks and a ragged last one
        eye = torch.eye(k)[k0:k0 + 37]
        got = dp_mm(eye, w)
        assert torch.equal(got.view(torch.int16), want[k0:k0 + eye.shape[0]].view(torch.int16)), k0


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 31, 33, 100, 300])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_row_count_matches_the_expanded_gemm(m, threads):
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=1))
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
    assert_matches_expanded_gemm(dp_mm(x, w, threads), x, w)


def test_the_backend_routes_batched_steps_to_the_kernel(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")  # on an AMX machine too: the AVX512-BF16 path is its fallback
    backend = CPUBackend(threads=2, warmup=False)
    assert backend.capabilities().notes["avx512_bf16_kernels"]
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 192, 576, seed=2))
    calls = []
    monkeypatch.setattr(cpu_backend, "int4_dpbf16_matmul",
                        lambda *a: calls.append(a[0].shape[0]) or int4_dpbf16_matmul(*a))
    low = max(cpu_backend.DPBF16_MIN_ROWS, backend._gemv_rows + 1)  # fewer rows: int4_gemv or ATen's kernel
    for m in (1, low - 1, low, 32, 600):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
        for xs in (x, x.float()):  # the short path (bf16 rows) and the converting one
            y = backend.linear(xs, w)
            assert y.shape == (m, 192) and y.dtype == xs.dtype
            torch.testing.assert_close(y.float(), x.float() @ w.expand_f32_t(), rtol=2e-2, atol=2e-2)
    assert calls == [low, low, 32, 32, 600, 600]


def test_edgellm_dpbf16_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setenv("EDGELLM_DPBF16", "0")
    backend = CPUBackend(threads=2, warmup=False)
    assert not backend.capabilities().notes["avx512_bf16_kernels"]
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 64, 32))
    monkeypatch.setattr(cpu_backend, "int4_dpbf16_matmul", lambda *a: pytest.fail("AVX512-BF16 kernel called"))
    y = backend.linear(torch.randn(40, 32).bfloat16(), w)
    assert y.shape == (40, 64)


@pytest.mark.parametrize("m", [1, 4, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (1024, 64)])
def test_int8_matches_float64(m, n, k):
    x, qw, scale = int8_case(m, n, k)
    out = np.full((m, n), np.nan, np.float32)
    int8_dpbf16_matmul(x.view(torch.uint16).numpy(), qw.numpy(), scale.float().numpy(), out, 2)
    assert_matches_float64(out, x, qw, scale)


@pytest.mark.parametrize("m", [cpu_backend.INT8_GEMV_MAX_ROWS, 40])
def test_greedy_steps_through_the_int8_kernel_keep_the_exact_argmax(m, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    assert_greedy_head_exact(m, monkeypatch, "int8_dpbf16_matmul")
