"""The CPU backend's fused rotary + paged attention gives the numbers of the two ops it replaces."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgellm.backends.base import Backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.paged_attention import prefetch_slots

H, D = 6, 64


def _cos_sin(max_pos: int) -> torch.Tensor:
    ang = torch.arange(max_pos)[:, None] * torch.rand(D // 2, generator=torch.Generator().manual_seed(5))
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


def _run(backend, unfused: bool, seqs, n_kv, kv_dtype, qkv_dtype, paged_batch, window=None, invariant=False):
    _, _, _, kv, meta = paged_batch(seqs, H, n_kv, D, 16, kv_dtype=kv_dtype, seed=3)
    meta = dataclasses.replace(meta, batch_invariant=invariant)
    t = int(meta.slot_mapping.shape[0])
    qkv = torch.randn(t, (H + 2 * n_kv) * D, generator=torch.Generator().manual_seed(9)).to(qkv_dtype)
    positions = torch.cat([torch.arange(ctx - nq, ctx) for ctx, nq in seqs])
    backend.begin_step(meta)
    op = Backend.rope_attention if unfused else type(backend).rope_attention
    out = op(backend, qkv, H, n_kv, D, positions, _cos_sin(1024), kv, meta, D ** -0.5, window)
    return out, kv


DECODES = [(37, 1), (300, 1), (16, 1), (1, 1)]  # one context longer than a decode work item (256 keys)


def _backend(amx: bool, monkeypatch) -> CPUBackend:
    """The CPU backend with its AMX kernels (where the CPU has AMX) or with the AVX-512 ones only."""
    monkeypatch.setenv("EDGELLM_AMX", "1" if amx else "0")
    return CPUBackend(threads=2, warmup=False)


@pytest.mark.parametrize("n_kv", [1, 2, 6])
@pytest.mark.parametrize("kv_dtype,qkv_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("amx", [True, False], ids=["amx-if-present", "avx512"])
def test_fused_decode_step_matches_rotary_then_attention(n_kv, kv_dtype, qkv_dtype, window, amx, paged_batch,
                                                         monkeypatch):
    cpu = _backend(amx, monkeypatch)
    got, kv_got = _run(cpu, False, DECODES, n_kv, kv_dtype, qkv_dtype, paged_batch, window)
    want, kv_want = _run(cpu, True, DECODES, n_kv, kv_dtype, qkv_dtype, paged_batch, window)
    assert got.shape == (4, H * D) and got.dtype == qkv_dtype
    assert torch.equal(got, want) and torch.equal(kv_got, kv_want)
    ref, _ = _run(TorchBackend(), True, DECODES, n_kv, kv_dtype, qkv_dtype, paged_batch, window)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("amx", [True, False], ids=["amx-if-present", "avx512"])
def test_steps_with_prompts_give_the_same_numbers(invariant, amx, paged_batch, monkeypatch):
    """Prompt chunks take the fused kernel only in batch-invariant mode; either way nothing changes."""
    seqs = [(40, 1), (70, 30), (20, 20)]
    cpu = _backend(amx, monkeypatch)
    got, kv_got = _run(cpu, False, seqs, 2, torch.bfloat16, torch.bfloat16, paged_batch, invariant=invariant)
    want, kv_want = _run(cpu, True, seqs, 2, torch.bfloat16, torch.bfloat16, paged_batch, invariant=invariant)
    assert torch.equal(got, want) and torch.equal(kv_got, kv_want)


@pytest.mark.parametrize("dtype, row", [(np.uint16, 64), (np.uint16, 128), (np.int8, 68)])
def test_prefetching_the_slots_changes_nothing(dtype, row):
    """``prefetch_slots`` only asks for the lines a step will write (padding slots, -1, skipped;
    rows up to the cache's last byte): the cache is unchanged and nothing reads out of bounds."""
    kv = np.random.default_rng(0).integers(0, 100, (2, 6, 3, 16, row)).astype(dtype)
    before = kv.copy()
    prefetch_slots(kv, np.array([0, -1, 17, 6 * 16 - 1, 40], np.int64))
    prefetch_slots(kv, np.zeros(0, np.int64))
    assert np.array_equal(kv, before)
