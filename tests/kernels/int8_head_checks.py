"""Checks shared by the int8 head kernels' tests (AMX, AVX512-BF16, VNNI): float64 references and the
exact argmax of greedy steps."""
from __future__ import annotations

import numpy as np
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.torch_ref import TorchBackend
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows


def int8_case(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x bf16 [m, k], qw int8 [n, k], scale bf16 [n])``, seeded by the shape."""
    g = torch.Generator().manual_seed(m * 7 + n)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01).bfloat16()
    return torch.randn(m, k, generator=g).bfloat16(), qw, scale


def assert_matches_float64(out: np.ndarray, x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor) -> None:
    """``out = (x @ qw^T) * scale`` with exact products, float32 sums (k of them) and one float32 scaling."""
    want = (x.double() @ qw.double().t()) * scale.double()
    bound = (qw.shape[1] + 2) * 2.0 ** -24 * (x.double().abs() @ qw.double().abs().t()) * scale.double() + 1e-30
    assert ((torch.from_numpy(out).double() - want).abs() <= bound).all()


def assert_greedy_head_exact(m: int, monkeypatch, kernel_name: str) -> None:
    """A greedy step of ``m`` rows calls ``cpu_backend.<kernel_name>`` once and keeps the exact argmax,
    on rows made of near-ties on purpose (rows close to a weight row make its logit the clear maximum,
    the others flat)."""
    n, k = 2048, 576
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(m)) * 0.05
    q8 = QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k))
    backend = CPUBackend(threads=2, warmup=False)
    head = backend.prepare_weight(q8, torch.float32, "lm_head")
    kernel = getattr(cpu_backend, kernel_name)
    calls = []
    monkeypatch.setattr(cpu_backend, kernel_name, lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    hidden = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + m)) * 0.1
    hidden[::2] += q8.dequantize()[torch.arange(0, m, 2) % n] * 3
    fast = backend.logits(hidden, head, argmax_cols=n).argmax(-1)
    exact = TorchBackend().logits(hidden, q8).argmax(-1)
    assert calls == [m]
    assert torch.equal(fast, exact)
    assert torch.equal(backend.greedy_tokens(hidden, head, n), exact)
