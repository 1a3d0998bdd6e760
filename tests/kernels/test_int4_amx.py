"""The AMX int4 kernel against the bf16 expansion it must equal, and the backend's choice of it.

These run where the CPU has AMX-BF16 (Sapphire Rapids and later); elsewhere the backend never
calls the kernel, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.kernels.cpu.amx import (
    make_config,
    request_amx,
    tile_config,
    tile_dp_bf16,
    tile_load,
    tile_release,
    tile_store,
    tile_zero,
)
from edgellm.kernels.cpu.int4_amx import int4_amx_matmul
from tests.kernels.test_bf16_expand import assert_matches_expanded_gemm, quantized

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX-BF16")


def amx_mm(x: torch.Tensor, w: Int4PackedWeight, threads: int = 2) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    packed, sz = w.amx_operands
    int4_amx_matmul(x.bfloat16().contiguous().view(torch.uint16).numpy(), packed, sz,
                    out.view(torch.uint16).numpy(), make_config(), threads)
    return out


@njit
def _one_tile_product(cfg, a, b, c):
    tile_config(cfg)
    tile_zero(0)
    tile_load(4, a, 0, 64)
    tile_load(6, b, 0, 64)
    tile_dp_bf16(0, 4, 6)
    tile_store(0, c, 0, 64)
    tile_release()


def test_one_tile_product_is_a_bf16_matmul():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g).bfloat16()
    b = torch.randn(32, 16, generator=g).bfloat16()
    vnni = b.view(16, 2, 16).transpose(1, 2).contiguous()  # row r: the pairs b[2r, n], b[2r + 1, n]
    c = np.zeros((16, 16), np.float32)
    _one_tile_product(make_config(), a.view(torch.uint16).numpy(), vnni.view(torch.uint16).numpy().reshape(16, 32), c)
    torch.testing.assert_close(torch.from_numpy(c), a.float() @ b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n, k", [(64, 32), (192, 576), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [32, 64])
def test_identity_rows_give_the_expanded_weight_bit_for_bit(fmt, n, k, rows):
    """One-hot rows pick single weights: the kernel's bf16 dequantization must be the expansion's."""
    w = Int4PackedWeight.from_quantized(quantized(fmt, n, k))
    want = w.expand_f32_t().bfloat16()  # [K, N]: exact float32 value rounded to nearest even
    for k0 in range(0, k, rows):
        eye = torch.eye(k)[k0:k0 + rows]
        got = amx_mm(eye, w)
        assert torch.equal(got.view(torch.int16), want[k0:k0 + eye.shape[0]].view(torch.int16)), (k0, rows)


@pytest.mark.parametrize("m", [1, 5, 16, 17, 31, 32, 33, 100, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_any_row_count_matches_the_expanded_gemm(m, threads):
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=1))
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
    assert_matches_expanded_gemm(amx_mm(x, w, threads), x, w)


@pytest.mark.parametrize("k", [32, 64, 480])
@pytest.mark.parametrize("m", [20, 32, 33, 100])
def test_each_chunk_is_rounded_out_during_the_next_ones_products(k, m):
    """A chunk's sums reach ``out`` two rows a group while the next chunk (or panel) multiplies, the
    rest after it (K under 512: fewer than two rows a group), the last after the worker's final one:
    on one thread every panel and chunk but the last hands its rows on."""
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 192, k, seed=k))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    for threads in (1, 2):
        assert_matches_expanded_gemm(amx_mm(x, w, threads), x, w)


@pytest.mark.parametrize("m", [17, 100])
def test_rows_of_a_wider_array_are_read_as_the_rows_they_are(m):
    """A strided ``x`` (the first 576 of 640 columns), its partial last tile among them."""
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=3))
    wide = torch.randn(m, 640, generator=torch.Generator().manual_seed(m)).bfloat16()
    x = wide[:, :576]
    out = torch.empty(m, 960, dtype=torch.bfloat16)
    packed, sz = w.amx_operands
    int4_amx_matmul(x.view(torch.uint16).numpy(), packed, sz, out.view(torch.uint16).numpy(), make_config(), 2)
    assert torch.equal(out.view(torch.int16), amx_mm(x.contiguous(), w).view(torch.int16))
    assert_matches_expanded_gemm(out, x, w)


@pytest.mark.parametrize("k", [576, 2048])
def test_the_backend_routes_mid_sized_steps_to_amx(k, monkeypatch):
    """Tiles from AMX_MIN_ROWS rows to AMX_MAX_ROWS, then on while the activations fit in L2 (all of
    SmolLM2's 1,024 rows of 576 inputs; a 1B model's 512 rows of 2,048), the expanded GEMM past them."""
    backend = CPUBackend(threads=2, warmup=False)
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 192, k, seed=2))
    calls = []
    monkeypatch.setattr(cpu_backend, "int4_amx_matmul", lambda *a: calls.append(a[0].shape[0]) or int4_amx_matmul(*a))
    widest = min(cpu_backend.AMX_MATMUL_MAX_ROWS, cpu_backend.AMX_MATMUL_MAX_ELEMENTS // k)
    for m in (1, cpu_backend.AMX_MIN_ROWS - 1, cpu_backend.AMX_MIN_ROWS, 32, cpu_backend.AMX_MAX_ROWS, widest,
              widest + 1):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        y = backend.linear(x, w)
        assert y.shape == (m, 192) and y.dtype == torch.bfloat16
        ref = x.float() @ w.expand_f32_t()
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert calls == [cpu_backend.AMX_MIN_ROWS, 32, cpu_backend.AMX_MAX_ROWS, widest]
    assert widest == (1024 if k == 576 else 512)


def test_edgellm_amx_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    backend = CPUBackend(threads=2, warmup=False)
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 64, 32))
    assert not backend.uses_amx
    monkeypatch.setattr(cpu_backend, "int4_amx_matmul", lambda *a: pytest.fail("AMX kernel called"))
    backend.linear(torch.randn(32, 32).bfloat16(), w)
