"""Decode attention with AVX512-BF16 scores against the float32 reference and the AVX-512 kernel.

These run where the CPU has AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later); elsewhere the
backend never calls the kernel, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.attention_dpbf16 import (
    _prefetch_plan,
    paged_attention_step_dp,
    rope_attention_step_dp,
    supports,
)
from edgellm.kernels.cpu.dpbf16 import supported
from edgellm.kernels.cpu.key_fold import key_order
from edgellm.kernels.cpu.paged_attention import paged_attention_step, rope_attention_step

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-BF16")

REF = TorchBackend()


def _run(kernel, q, k, v, kv, meta, scale, window, cap, threads):
    out = np.full(tuple(q.shape), 0xFFFF, np.uint16)  # NaN bits: every row must be written
    cache = kv.numpy() if kv.dtype == torch.int8 else kv.view(torch.uint16).numpy()
    kernel(out, q.numpy(), k.numpy(), v.view(torch.uint16).numpy(), cache,
           meta.slot_mapping.numpy(), meta.query_start_loc.numpy(), meta.seq_lens.numpy(),
           meta.block_tables.numpy(), scale, window or 0, cap or 0.0, 16, threads)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float()


# a single key, a block edge, a partial block, odd lengths, and two longer than a work item (256
# keys), which split across threads and merge; then a prompt chunk among the decodes
BATCHES = {"decodes": [(c, 1) for c in (1, 16, 37, 95, 300, 600)],
           "mixed": [(40, 1), (23, 23), (300, 1), (70, 9)]}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("group, head_dim", [(1, 64), (3, 64), (8, 64), (4, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window, cap", [(None, None), (20, None), (None, 30.0)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_decodes_match_the_float32_reference(paged_batch, batch, group, head_dim, block_size, window, cap,
                                             threads, kv_dtype):
    """bf16: q enters the dot products as bf16 hi + lo pairs (float32-class scores). int8
    (``attention_vnni_int8``): the reference dequantizes the same rows, and the int16 products with q
    (to 1/32767 of its largest element) are exact. The output rounds to bf16 either way."""
    n_kv = 2
    q, k, v, kv, meta = paged_batch(BATCHES[batch], group * n_kv, n_kv, head_dim, block_size,
                                    kv_dtype=kv_dtype, seed=group + block_size)
    v = v.bfloat16()
    want = REF.attention(q, k, v.float(), kv.clone(), meta, 0.125, window, cap)
    got = _run(paged_attention_step_dp, q, k, v, kv.clone(), meta, 0.125, window, cap, threads)
    bf16 = kv_dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=8e-3 if bf16 else 1e-2, atol=1e-5 if bf16 else 5e-5)
    avx = _run(paged_attention_step, q, k, v, kv.clone(), meta, 0.125, window, cap, threads)
    assert (got != avx).float().mean() < (0.02 if bf16 else 0.05)  # a last-bit difference here and there


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_fused_rope_step_matches_the_avx512_kernel(paged_batch, kv_dtype):
    """``rope_attention_step_dp`` is ``rope_attention_step`` with the dp scores: same rotary and cache
    writes, outputs within a last bf16 bit."""
    n_kv, group, d = 3, 3, 64
    q, k, v, kv, meta = paged_batch([(c, 1) for c in (5, 64, 290)], group * n_kv, n_kv, d, 16,
                                    kv_dtype=kv_dtype, seed=7)
    t = q.shape[0]
    qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=1).bfloat16().contiguous()
    positions = (meta.seq_lens - 1).long().numpy()
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    ang = np.arange(512)[:, None] * inv[None, :]
    cos_sin = np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    outs, caches = [], []
    for kernel in (rope_attention_step_dp, rope_attention_step):
        cache = kv.clone().numpy() if kv_dtype == torch.int8 else kv.clone().view(torch.uint16).numpy()
        out = np.zeros((t, group * n_kv, d), np.uint16)
        kernel(out, qkv.view(torch.uint16).numpy(), positions, cos_sin, cache, meta.slot_mapping.numpy(),
               meta.query_start_loc.numpy(), meta.seq_lens.numpy(), meta.block_tables.numpy(), 0.125, 0, 0.0,
               16, 2)
        outs.append(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float())
        caches.append(cache)
    assert np.array_equal(caches[0], caches[1])
    bf16 = kv_dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1], rtol=8e-3 if bf16 else 1e-2, atol=1e-5 if bf16 else 5e-5)


def test_garbage_in_unused_slots_never_leaks(paged_batch):
    """Slots past a context are scored with the real keys of their block: NaN there must not reach
    the output (each lane of the folded scores belongs to one key)."""
    q, k, v, kv, meta = paged_batch([(37, 1), (5, 1), (16, 1)], 6, 2, 64, 16, kv_dtype=torch.bfloat16, seed=4)
    v = v.bfloat16()
    clean = _run(paged_attention_step_dp, q, k, v, kv.clone(), meta, 0.125, None, None, 1)
    dirty = kv.clone()
    for seq, ctx in enumerate(meta.seq_lens.tolist()):
        for pos in range(ctx, -(-ctx // 16) * 16):
            blk = meta.block_tables[seq, pos // 16]
            dirty[:, blk, :, pos % 16] = float("nan")
    got = _run(paged_attention_step_dp, q, k, v, dirty, meta, 0.125, None, None, 1)
    assert torch.equal(got, clean)


def test_int8_garbage_in_unused_slots_never_leaks(paged_batch):
    """Rows past a context are scored with their block's real keys: their codes and NaN scales must not
    count."""
    q, k, v, kv, meta = paged_batch([(37, 1), (5, 1), (16, 1)], 6, 2, 64, 16, kv_dtype=torch.int8, seed=4)
    v = v.bfloat16()
    clean = _run(paged_attention_step_dp, q, k, v, kv.clone(), meta, 0.125, None, None, 1)
    dirty = kv.clone()
    nan = torch.tensor([float("nan")]).view(torch.int8)
    for seq, ctx in enumerate(meta.seq_lens.tolist()):
        for pos in range(ctx, -(-ctx // 16) * 16):
            blk = meta.block_tables[seq, pos // 16]
            dirty[:, blk, :, pos % 16, :64] = 127
            dirty[:, blk, :, pos % 16, 64:] = nan
    got = _run(paged_attention_step_dp, q, k, v, dirty, meta, 0.125, None, None, 1)
    assert torch.equal(got, clean)


def test_folded_lanes_hold_every_key_once():
    assert sorted(key_order()) == list(range(16))


def test_supported_shapes():
    bf16 = np.zeros((2, 4, 2, 16, 64), np.uint16)
    assert supports(bf16, 3) and supports(bf16, 16) and supports(np.zeros((2, 4, 2, 32, 128), np.uint16), 4)
    assert not supports(bf16, 17)
    assert not supports(bf16.astype(np.float32), 3)
    assert not supports(np.zeros((2, 4, 2, 8, 64), np.uint16), 3)
    assert not supports(np.zeros((2, 4, 2, 16, 96), np.uint16), 3)
    int8 = np.zeros((2, 4, 2, 16, 64 + 4), np.int8)  # codes, then the row's float32 scale
    assert supports(int8, 3) and supports(np.zeros((2, 4, 2, 32, 128 + 4), np.int8), 4)
    assert not supports(np.zeros((2, 4, 2, 16, 64), np.int8), 3)
    assert not supports(np.zeros((2, 4, 2, 8, 68), np.int8), 3)


@pytest.mark.parametrize("group, head_dim, block_size", [(1, 64, 16), (3, 64, 16), (4, 128, 32), (8, 64, 32)])
def test_prefetch_plan_covers_a_blocks_k_and_v_rows(group, head_dim, block_size):
    """The query heads' shares of prefetching a cache block: together every cache line of that
    block's K rows and V rows of the kv head, each once, at their bytes in the cache."""
    n_blocks, n_kv = 7, 2
    kv = np.zeros((2, n_blocks, n_kv, block_size, head_dim), np.uint16)
    for block, hk in ((0, 0), (5, 1), (6, 0)):
        plans = [_prefetch_plan(kv, block, hk, g, group) for g in range(group)]
        k_byte, v_byte = plans[0][:2]
        assert all(p[:2] == (k_byte, v_byte) for p in plans)
        assert k_byte == kv[0, block, hk].ctypes.data - kv.ctypes.data
        assert v_byte == kv[1, block, hk].ctypes.data - kv.ctypes.data
        covered = [line for p in plans for line in range(p[2], p[3])]  # each share: those lines of K and of V
        assert covered == list(range(kv[0, block, hk].nbytes // 64))
    assert _prefetch_plan(kv, -1, 0, 0, group)[2:4] == (0, 0)  # no block ahead: nothing
    int8 = np.zeros((2, n_blocks, n_kv, block_size, head_dim + 4), np.int8)
    assert _prefetch_plan(int8, 3, 1, 0, group)[2:4] == (0, 0)  # int8 caches prefetch whole blocks
