"""Decode attention with AVX512-BF16 dot products against the float32 reference and the AVX-512 kernel.

These run where the CPU has AVX512-BF16; elsewhere the backend never calls the kernel, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.attention_dpbf16 import paged_attention_step_dp, supports
from edgellm.kernels.cpu.dpbf16 import supported
from edgellm.kernels.cpu.paged_attention import paged_attention_step

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-BF16")

REF = TorchBackend()
D = 64


def _run(kernel, q, k, v, kv, meta, scale, window, cap, threads):
    out = np.full(tuple(q.shape), 0xFFFF, np.uint16)  # NaN bits: every row must be written
    kernel(out, q.numpy(), k.numpy(), v.view(torch.uint16).numpy(), kv.view(torch.uint16).numpy(),
           meta.slot_mapping.numpy(), meta.query_start_loc.numpy(), meta.seq_lens.numpy(),
           meta.block_tables.numpy(), scale, window or 0, cap or 0.0, 16, threads)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float()


# one context per kind: a single key, a block edge, a partial block, odd lengths, and two longer than a
# work item (256 keys), which split across threads and merge
CONTEXTS = [1, 16, 37, 95, 300, 600]


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("window, cap", [(None, None), (20, None), (None, 30.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_decodes_match_the_float32_reference(paged_batch, group, block_size, window, cap, threads):
    n_kv = 2
    q, k, v, kv, meta = paged_batch([(c, 1) for c in CONTEXTS], group * n_kv, n_kv, D, block_size,
                                    kv_dtype=torch.bfloat16, seed=group + block_size)
    v = v.bfloat16()
    want = REF.attention(q, k, v.float(), kv.clone(), meta, 0.125, window, cap)
    got = _run(paged_attention_step_dp, q, k, v, kv.clone(), meta, 0.125, window, cap, threads)
    # q and p enter the products as bf16 hi + lo pairs: float32-class scores; the output rounds to bf16
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-5)
    avx = _run(paged_attention_step, q, k, v, kv.clone(), meta, 0.125, window, cap, threads)
    assert (got != avx).float().mean() < 0.02  # at most a last-bit difference here and there


def test_prompt_rows_in_the_same_step_take_the_avx512_kernel(paged_batch):
    q, k, v, kv, meta = paged_batch([(40, 1), (70, 1), (33, 33), (50, 7)], 9, 3, D, 16, kv_dtype=torch.bfloat16,
                                    seed=3)
    v = v.bfloat16()
    want = REF.attention(q, k, v.float(), kv.clone(), meta, 0.125)
    got = _run(paged_attention_step_dp, q, k, v, kv.clone(), meta, 0.125, None, None, 2)
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-5)


def test_garbage_in_unused_slots_never_leaks(paged_batch):
    """Slots past a context share blocks with real keys: NaN there must not reach the output."""
    q, k, v, kv, meta = paged_batch([(37, 1), (5, 1), (16, 1), (9, 1)], 6, 2, D, 16, kv_dtype=torch.bfloat16, seed=4)
    v = v.bfloat16()
    clean = _run(paged_attention_step_dp, q, k, v, kv.clone(), meta, 0.125, None, None, 1)
    dirty = kv.clone()
    for seq, ctx in enumerate(meta.seq_lens.tolist()):
        for pos in range(ctx, -(-ctx // 16) * 16):
            blk = meta.block_tables[seq, pos // 16]
            dirty[:, blk, :, pos % 16] = float("nan")
    got = _run(paged_attention_step_dp, q, k, v, dirty, meta, 0.125, None, None, 1)
    assert torch.equal(got, clean)


def test_supported_shapes():
    bf16 = np.zeros((2, 4, 2, 16, 64), np.uint16)
    assert supports(bf16, 3) and supports(bf16, 8)
    assert not supports(bf16, 9)  # hi and lo of nine heads need 18 lanes
    assert not supports(bf16.astype(np.float32), 3)
    assert not supports(np.zeros((2, 4, 2, 12, 64), np.uint16), 3)
    assert not supports(np.zeros((2, 4, 2, 16, 128), np.uint16), 3)


def test_the_backend_routes_bf16_decodes_to_the_kernel(paged_batch, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    backend = CPUBackend(threads=2, warmup=False)
    calls = []
    monkeypatch.setattr(cpu_backend, "paged_attention_step_dp",
                        lambda *a: calls.append(a[1].shape[0]) or paged_attention_step_dp(*a))
    q, k, v, kv, meta = paged_batch([(c, 1) for c in CONTEXTS], 9, 3, D, 16, kv_dtype=torch.bfloat16, seed=5)
    got = backend.attention(q, k, v.bfloat16(), kv.clone(), meta, 0.125)
    want = REF.attention(q, k, v.bfloat16().float(), kv.clone(), meta, 0.125)
    assert calls == [len(CONTEXTS)]
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-5)
