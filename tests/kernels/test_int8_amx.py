"""The AMX int8 head kernel against float64, and greedy steps through it keeping the exact argmax.

These run where the CPU has AMX-BF16; elsewhere the backend never calls the kernel, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.amx import make_config, request_amx
from edgellm.kernels.cpu.int8_amx import int8_amx_matmul
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX-BF16")


@pytest.mark.parametrize("m", [1, 4, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (1024, 64)])
def test_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    out = np.full((m, n), np.nan, np.float32)
    int8_amx_matmul(x.view(torch.uint16).numpy(), qw.numpy(), scale.float().numpy(), out, make_config(), 2)
    want = (x.double() @ qw.double().t()) * scale.double()
    # exact products, float32 sums (k of them) and one float32 scaling
    bound = (k + 2) * 2.0 ** -24 * (x.double().abs() @ qw.double().abs().t()) * scale.double() + 1e-30
    assert ((torch.from_numpy(out).double() - want).abs() <= bound).all()


@pytest.mark.parametrize("m", [cpu_backend.AMX_HEAD_MIN_ROWS, 32, 40])
def test_greedy_steps_through_amx_keep_the_exact_argmax(m, monkeypatch):
    n, k = 2048, 576
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(m)) * 0.05
    q8 = QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k))
    backend = CPUBackend(threads=2, warmup=False)
    head = backend.prepare_weight(q8, torch.float32, "lm_head")
    calls = []
    monkeypatch.setattr(cpu_backend, "int8_amx_matmul", lambda *a: calls.append(a[0].shape[0]) or int8_amx_matmul(*a))
    # near-ties on purpose: rows close to a weight row make its logit the clear maximum, others flat
    hidden = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m)) * 0.1
    hidden[::2] += q8.dequantize()[torch.arange(0, m, 2) % n] * 3
    fast = backend.logits(hidden, head, argmax_cols=n).argmax(-1)
    exact = TorchBackend().logits(hidden, q8).argmax(-1)
    assert calls == [m]
    assert torch.equal(fast, exact)
    assert torch.equal(backend.greedy_tokens(hidden, head, n), exact)
