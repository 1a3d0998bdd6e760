"""Decode attention on AMX tiles against the float32 reference and the AVX-512 kernel, for bf16 caches
(``attention_amx``) and int8 ones (``attention_amx_int8``, behind the same entry points).

These run where the CPU has AMX-BF16; elsewhere the backend never calls the kernel, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.amx import make_config, request_amx
from edgellm.kernels.cpu.attention_amx import paged_attention_step_amx, supports
from edgellm.kernels.cpu.paged_attention import paged_attention_step

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX-BF16")

REF = TorchBackend()
D = 64


def _run(kernel, q, k, v, kv, meta, scale, window, cap, threads, *extra):
    out = np.full(tuple(q.shape), 0xFFFF, np.uint16)  # NaN bits: every row must be written
    cache = kv.numpy() if kv.dtype == torch.int8 else kv.view(torch.uint16).numpy()
    kernel(out, q.numpy(), k.numpy(), v.view(torch.uint16).numpy(), cache,
           meta.slot_mapping.numpy(), meta.query_start_loc.numpy(), meta.seq_lens.numpy(),
           meta.block_tables.numpy(), scale, window or 0, cap or 0.0, 16, threads, *extra)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float()


# one context per kind: a single key, a block edge, a partial tile, odd lengths, and two longer than a
# work item (256 keys), which split across threads and merge
CONTEXTS = [1, 16, 37, 95, 300, 600]


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window, cap", [(None, None), (20, None), (None, 30.0)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_decodes_match_the_float32_reference(paged_batch, group, block_size, window, cap, threads, kv_dtype):
    """bf16: q enters the tiles as bf16 hi + lo pairs (float32-class scores). int8: the reference
    dequantizes the same rows, and the tiles multiply q's hi and lo bytes exactly (q to ~1/64000 of its
    largest element). p meets V in float32 and the output rounds to bf16 either way."""
    n_kv = 2
    q, k, v, kv, meta = paged_batch([(c, 1) for c in CONTEXTS], group * n_kv, n_kv, D, block_size,
                                    kv_dtype=kv_dtype, seed=group + block_size)
    v = v.bfloat16()
    want = REF.attention(q, k, v.float(), kv.clone(), meta, 0.125, window, cap)
    got = _run(paged_attention_step_amx, q, k, v, kv.clone(), meta, 0.125, window, cap, threads, make_config())
    bf16 = kv_dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=8e-3 if bf16 else 1e-2, atol=1e-5 if bf16 else 5e-5)
    avx = _run(paged_attention_step, q, k, v, kv.clone(), meta, 0.125, window, cap, threads)
    assert (got != avx).float().mean() < (0.02 if bf16 else 0.05)  # a last-bit difference here and there


def test_int8_garbage_in_unused_slots_never_leaks(paged_batch):
    """Rows past a context share score tiles with real keys: their codes and NaN scales must not count."""
    q, k, v, kv, meta = paged_batch([(37, 1), (5, 1), (16, 1)], 6, 2, D, 16, kv_dtype=torch.int8, seed=4)
    v = v.bfloat16()
    clean = _run(paged_attention_step_amx, q, k, v, kv.clone(), meta, 0.125, None, None, 1, make_config())
    dirty = kv.clone()
    nan = torch.tensor([float("nan")]).view(torch.int8)
    for seq, ctx in enumerate(meta.seq_lens.tolist()):
        for pos in range(ctx, -(-ctx // 16) * 16):
            blk = meta.block_tables[seq, pos // 16]
            dirty[:, blk, :, pos % 16, :D] = 127
            dirty[:, blk, :, pos % 16, D:] = nan
    got = _run(paged_attention_step_amx, q, k, v, dirty, meta, 0.125, None, None, 1, make_config())
    assert torch.equal(got, clean)


def test_garbage_in_unused_slots_never_leaks(paged_batch):
    """Slots past a context share tiles with real keys: NaN there must not reach the output."""
    q, k, v, kv, meta = paged_batch([(37, 1), (5, 1), (16, 1)], 6, 2, D, 16, kv_dtype=torch.bfloat16, seed=4)
    v = v.bfloat16()
    clean = _run(paged_attention_step_amx, q, k, v, kv.clone(), meta, 0.125, None, None, 1, make_config())
    dirty = kv.clone()
    for seq, ctx in enumerate(meta.seq_lens.tolist()):
        for pos in range(ctx, -(-ctx // 16) * 16):
            blk = meta.block_tables[seq, pos // 16]
            dirty[:, blk, :, pos % 16] = float("nan")
    got = _run(paged_attention_step_amx, q, k, v, dirty, meta, 0.125, None, None, 1, make_config())
    assert torch.equal(got, clean)


def test_supported_shapes():
    bf16 = np.zeros((2, 4, 2, 16, 64), np.uint16)
    assert supports(bf16, 3) and supports(bf16, 8)
    assert not supports(bf16, 9)  # hi and lo of nine heads need 18 tile columns
    assert not supports(bf16.astype(np.float32), 3)
    assert not supports(np.zeros((2, 4, 2, 8, 64), np.uint16), 3)
    assert not supports(np.zeros((2, 4, 2, 16, 128), np.uint16), 3)
    int8 = np.zeros((2, 4, 2, 16, 64 + 4), np.int8)  # codes, then the row's float32 scale
    assert supports(int8, 3) and supports(int8, 8) and not supports(int8, 9)
    assert not supports(np.zeros((2, 4, 2, 8, 68), np.int8), 3)
    assert not supports(np.zeros((2, 4, 2, 16, 132), np.int8), 3)
