"""The AVX512-VNNI int8 head kernel: exact integer sums, the int16 activations it reports, and greedy
steps through it keeping the exact argmax. Skips on CPUs without AVX512-VNNI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.int8_gemv import int8_gemv, quantize_rows_int16, supported, xq_limit
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows
from tests.kernels.int8_head_checks import assert_greedy_head_exact

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-VNNI")


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 17])
@pytest.mark.parametrize("n, k", [(32, 32), (300, 576), (1024, 2048)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_float64_of_the_quantized_rows(m, n, k, threads):
    g = torch.Generator().manual_seed(m * 7 + n)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    qw[0] = 127  # the largest sums: must not overflow int32
    scale = torch.rand(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    x[0] = x[0].abs()
    xq, s = quantize_rows_int16(x.numpy(), xq_limit(k))
    assert np.abs(xq).max() <= xq_limit(k)
    used = torch.from_numpy(xq).double() * torch.from_numpy(s).double()[:, None]
    assert ((used - x.double()).abs() <= 0.51 * torch.from_numpy(s).double()[:, None]).all()
    out = np.full((m, n), np.nan, np.float32)
    int8_gemv(xq, s, qw.numpy(), scale.numpy(), out, threads)
    want = (used @ qw.double().t()) * scale.double()
    # the integer sums are exact: only their conversion to float32 and two scalings round
    torch.testing.assert_close(torch.from_numpy(out).double(), want, rtol=4 * 2.0 ** -24, atol=1e-30)


def test_the_int16_bound_keeps_int32_sums_safe():
    for k in (32, 576, 1032, 2048, 8192):
        assert xq_limit(k) * 127 * k <= 2 ** 31 - 1
    assert xq_limit(576) >= 2 ** 14 and xq_limit(8192) > 2 ** 8  # finer than a bf16 activation


@pytest.mark.parametrize("m", [1, 3, cpu_backend.VNNI_HEAD_MIN_ROWS - 1])
def test_greedy_steps_through_vnni_keep_the_exact_argmax(m, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")  # with AMX, steps from 4 rows take the AMX head instead
    assert_greedy_head_exact(m, monkeypatch, "int8_gemv")


def test_edgellm_vnni_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("EDGELLM_VNNI", "0")
    backend = CPUBackend(threads=2, warmup=False)
    q8 = QuantizedTensor("Q8_0", quantize_rows("Q8_0", torch.randn(64, 32)), (64, 32))
    head = backend.prepare_weight(q8, torch.float32, "lm_head")
    monkeypatch.setattr(cpu_backend, "int8_gemv", lambda *a: pytest.fail("VNNI kernel called"))
    assert backend.greedy_tokens(torch.randn(2, 32), head, 64).shape == (2,)
