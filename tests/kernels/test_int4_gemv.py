"""The int4 kernel for a few rows (AVX512-VNNI and VBMI, or AVX2): exact integer sums against float64 of
the activations it quantized, ATen's int4 kernel, the AVX2 body's bits against the AVX-512 body's, and
the backend's choice of it. Skips on CPUs without AVX2 (there the backend keeps ATen's kernel)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.kernels.cpu.int4_gemv import (
    MAX_ROWS,
    XQ_MAX,
    _block_rows_avx2,
    int4_gemv,
    isa,
    norm_int4_gemv,
    quantize_groups_int16,
    silu_int4_gemv,
    supported,
)
from tests.kernels.test_bf16_expand import quantized

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has neither AVX2 nor AVX512-VNNI and VBMI")


def gemv(x: torch.Tensor, w: Int4PackedWeight, threads: int = 2) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=torch.bfloat16)
    packed, sz = w.gemv_operands
    int4_gemv(x.bfloat16().contiguous().view(torch.uint16).numpy(), packed, sz, out.view(torch.uint16).numpy(),
              threads)
    return out


def used_activations(x: torch.Tensor) -> torch.Tensor:
    """The float64 activations the kernel multiplies: each group of 32 as ``xs * xq``."""
    xq, xs, _ = quantize_groups_int16(x.bfloat16().view(torch.uint16).numpy())
    return torch.from_numpy(xq).double() * torch.from_numpy(np.repeat(xs, 32, axis=1)).double()


def test_groups_quantize_to_15_bits_of_their_largest_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g) * torch.tensor([1e-3, 1.0, 300.0, 1.0]).repeat_interleave(32)
    x[1, 32:64] = 0.0  # an all-zero group
    x[2, 64] = 1e4  # one outlier only coarsens its own group
    xb = x.bfloat16()
    xq, xs, xsum = quantize_groups_int16(xb.view(torch.uint16).numpy())
    assert np.abs(xq).max() <= XQ_MAX
    used = used_activations(xb)
    err = (used - xb.double()).abs().view(3, 4, 32)
    assert (err <= 0.5 * torch.from_numpy(xs).double()[..., None] * (1 + 1e-6)).all()
    assert (torch.from_numpy(xq).view(3, 4, 32).abs().amax(-1)[torch.from_numpy(xs) != 1.0] == XQ_MAX).all()
    assert (used[1, 32:64] == 0).all()
    torch.testing.assert_close(torch.from_numpy(xsum).double(), used.view(3, 4, 32).sum(-1), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("n, k", [(64, 32), (960, 576), (576, 1536), (128, 8192)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_of_the_quantized_activations(fmt, m, n, k, threads):
    w = Int4PackedWeight.from_quantized(quantized(fmt, n, k, seed=m + n))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)) * 3
    got = gemv(x, w, threads).double()
    wt = w.expand_f32_t().double()  # the exact weights [K, N]
    want = used_activations(x) @ wt
    # exact integer sums; float32 for one multiply-add per group of 32; one bf16 rounding of the result
    tol = 2.0 ** -8 * want.abs() + 1e-5 * (x.double().abs() @ wt.abs())
    assert ((got - want).abs() <= tol).all()


@pytest.mark.parametrize("m", [1, 3, 8])
def test_agrees_with_atens_int4_kernel(m):
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 3072, 576, seed=3))
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
    ref = torch._weight_int4pack_mm_for_cpu(x, w.packed, 32, w.scale_zeros).double()
    got = gemv(x, w).double()
    scale = (x.double().abs() @ w.expand_f32_t().double().abs())
    assert ((got - ref).abs() <= 2.0 ** -7 * ref.abs() + 1e-4 * scale).all()


@njit
def _gemv_avx2(x, packed, sz, out):
    """``int4_gemv`` on one thread through the AVX2 body, whatever this CPU has beyond AVX2."""
    xq, xs, xsum = quantize_groups_int16(x)
    m = x.shape[0]
    for b in range(packed.shape[0]):
        for r0 in range(0, m, MAX_ROWS):
            r1 = min(m, r0 + MAX_ROWS)
            _block_rows_avx2(packed, b, xq[r0:r1], xs[r0:r1], xsum[r0:r1], r1 - r0, sz, out[r0:r1])


@pytest.mark.skipif(isa() != "avx512", reason="compares the AVX2 body with the AVX-512 one")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n, k", [(64, 32), (960, 576), (576, 1536)])
def test_the_avx2_body_gives_the_avx512_bodys_bits(m, n, k):
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", n, k, seed=m + k))
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    want = gemv(x, w)
    got = torch.full_like(want, float("nan"))
    packed, sz = w.gemv_operands
    _gemv_avx2(x.view(torch.uint16).numpy(), packed, sz, got.view(torch.uint16).numpy())
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_the_backend_routes_a_few_rows_to_the_kernel(monkeypatch):
    backend = CPUBackend(threads=2, warmup=False)
    top = backend._gemv_rows
    assert top >= cpu_backend.INT4_GEMV_MAX_ROWS
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 192, 576, seed=2))
    calls = []
    monkeypatch.setattr(cpu_backend, "int4_gemv", lambda *a: calls.append(a[0].shape[0]) or int4_gemv(*a))
    for m in (1, 2, top, top + 1, 40):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
        for xs in (x, x.float()):  # the short path (bf16 rows) and the converting one
            y = backend.linear(xs, w)
            assert y.shape == (m, 192) and y.dtype == xs.dtype
            torch.testing.assert_close(y.float(), x.float() @ w.expand_f32_t(), rtol=2e-2, atol=2e-2)
    assert calls == [1, 1, 2, 2, top, top]


def test_batch_invariant_mode_and_edgellm_vnni_0_keep_atens_kernel(monkeypatch):
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 64, 32))
    monkeypatch.setattr(cpu_backend, "int4_gemv", lambda *a: pytest.fail("int4_gemv called"))
    assert CPUBackend(threads=2, warmup=False, batch_invariant=True).linear(torch.randn(1, 32).bfloat16(), w).shape == (1, 64)
    monkeypatch.setenv("EDGELLM_VNNI", "0")
    backend = CPUBackend(threads=2, warmup=False)
    assert backend.linear(torch.randn(2, 32).bfloat16(), w).shape == (2, 64)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_norm_and_projection_give_the_two_ops_numbers(x_dtype, m, with_residual, monkeypatch):
    backend = CPUBackend(threads=2, warmup=False)
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=4))
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 576, generator=g) * 4).to(x_dtype)
    norm_w = torch.rand(576, generator=g) + 0.5
    residual = torch.randn(m, 576, generator=g) if with_residual else None
    calls = []
    monkeypatch.setattr(cpu_backend, "norm_int4_gemv", lambda *a: calls.append(1) or norm_int4_gemv(*a))
    y, res = backend.norm_linear(x, norm_w, 1e-5, None if residual is None else residual.clone(), w, None,
                                 torch.bfloat16)
    normed, want_res = backend.rms_norm(x, norm_w, 1e-5, None if residual is None else residual.clone(),
                                        torch.bfloat16)
    assert calls == [1]
    assert torch.equal(res, want_res)
    assert torch.equal(y.view(torch.int16), backend.linear(normed, w).view(torch.int16))


@pytest.mark.parametrize("m", [1, 5])
def test_fused_gated_mlp_gives_the_two_ops_numbers(m, monkeypatch):
    backend = CPUBackend(threads=2, warmup=False)
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 576, 1536, seed=5))
    x = (torch.randn(m, 3072, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    calls = []
    monkeypatch.setattr(cpu_backend, "silu_int4_gemv", lambda *a: calls.append(1) or silu_int4_gemv(*a))
    y = backend.act_linear(x, "silu", w)
    assert calls == [1]
    assert torch.equal(y.view(torch.int16), backend.linear(backend.act_and_mul(x), w).view(torch.int16))


def test_fused_ops_fall_back_to_the_two_ops_off_their_path(monkeypatch):
    backend = CPUBackend(threads=2, warmup=False)
    monkeypatch.setattr(cpu_backend, "norm_int4_gemv", lambda *a: pytest.fail("fused norm called"))
    monkeypatch.setattr(cpu_backend, "silu_int4_gemv", lambda *a: pytest.fail("fused MLP called"))
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 64, 32))
    many = torch.randn(backend._gemv_rows + 1, 32)
    y, _ = backend.norm_linear(many, torch.ones(32), 1e-6, None, w, None, torch.bfloat16)  # a prompt's rows
    assert y.shape == (many.shape[0], 64)
    y, _ = backend.norm_linear(many[:1], torch.ones(32), 1e-6, None, w, torch.ones(64), torch.bfloat16)  # a bias
    assert y.shape == (1, 64)
    assert backend.act_linear(torch.randn(1, 64).bfloat16(), "gelu_tanh", w).shape == (1, 64)


def test_the_gemv_scale_zeros_are_atens_block_by_block():
    """``gemv_operands``: the same packed weight, and ATen's scale-zeros ``[K/32, N]`` laid out as
    ``[N/64, K/32, 64]``, counted in the weight's bytes once built."""
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 192, 96, seed=5))
    packed, sz = w.amx_operands
    before = w.nbytes
    gemv_packed, blocks = w.gemv_operands
    assert np.shares_memory(gemv_packed, packed) and blocks.shape == (3, 3, 64) and blocks.dtype == np.uint32
    for b in range(3):
        for g in range(3):
            assert np.array_equal(blocks[b, g], sz[g, 64 * b:64 * (b + 1)])
    assert w.nbytes == before + blocks.nbytes


def test_operands_that_disagree_are_refused_not_overrun():
    """A wrong output width or ATen's 2-D scale-zeros (``amx_operands``) is an error, not a write past
    the output or a read of the wrong scales."""
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 128, 64, seed=1))
    x = np.zeros((1, 64), np.uint16)
    packed, sz = w.gemv_operands
    with pytest.raises(ValueError, match="disagree"):
        int4_gemv(x, packed, sz, np.empty((1, 64), np.uint16), 2)
    with pytest.raises(ValueError, match="disagree"):
        int4_gemv(np.zeros((1, 32), np.uint16), packed, sz, np.empty((1, 128), np.uint16), 2)
    with pytest.raises(Exception, match="(?i)typ"):  # Numba's typing error: no kernel for 2-D scale-zeros
        int4_gemv(x, packed, w.amx_operands[1], np.empty((1, 128), np.uint16), 2)
