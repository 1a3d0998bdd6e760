"""Numba paged attention against the torch reference over shapes, block layouts, masks and KV dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.cpu import CPUBackend
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.paged_attention import paged_attention_step, write_kv
from edgellm.quant.kv_int8 import dequantize_kv_rows, quantize_kv_rows

REF = TorchBackend()
CPU = CPUBackend(threads=2, warmup=False, batch_invariant=False)
INVARIANT = CPUBackend(threads=2, warmup=False, batch_invariant=True)


def ragged(block_size: int) -> list[tuple[int, int]]:
    """Decodes first (one ending on a block edge, as the engine orders a step), then a prefill from
    scratch and a chunk after cached context: the Numba kernel takes the decodes, and outside
    batch-invariant mode torch's flash attention takes the prompt chunks."""
    return [(2 * block_size, 1), (1, 1), (4 * block_size + 5, 1), (37, 37), (3 * block_size + 9, 20)]


def check(q, k, v, kv, meta, scale=0.125, window=None, cap=None, q_dtype=torch.float32) -> None:
    for backend in (CPU, INVARIANT):
        check_one(backend, q, k, v, kv, meta, scale, window, cap, q_dtype)


def check_one(backend, q, k, v, kv, meta, scale, window, cap, q_dtype) -> None:
    kv_ref, kv_cpu = kv.clone(), kv.clone()
    want = REF.attention(q, k, v, kv_ref, meta, scale, window, cap)
    backend.begin_step(meta)
    got = backend.attention(q.to(q_dtype), k.to(q_dtype), v.to(q_dtype), kv_cpu, meta, scale, window, cap)
    assert got.dtype == q_dtype
    if q_dtype == torch.float32:
        assert torch.equal(kv_cpu, kv_ref), "K/V must land in exactly the reference's slots and bits"
        dec = meta.num_decode_tokens
        if kv.dtype in (torch.bfloat16, torch.int8) and not backend.batch_invariant:
            # prompt chunks on a bf16 or int8 cache run flash attention in bf16 (q rounds); decodes stay exact
            torch.testing.assert_close(got[dec:], want[dec:], rtol=2e-2, atol=2e-2)
            got, want = got[:dec], want[:dec]
        if kv.dtype == torch.int8:  # on AMX-INT8 tiles q enters as 16-bit hi + lo bytes
            torch.testing.assert_close(got[:dec], want[:dec], rtol=1e-4, atol=1e-4)
            got, want = got[dec:], want[dec:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_ragged_batch_matches_reference(paged_batch, head_dim, group, block_size):
    n_kv = 2
    check(*paged_batch(ragged(block_size), group * n_kv, n_kv, head_dim, block_size))


@pytest.mark.parametrize("window, cap", [(7, None), (None, 30.0), (16, 5.0), (1, None)])
def test_sliding_window_and_soft_cap(paged_batch, window, cap):
    check(*paged_batch(ragged(16), 6, 2, 64, 16, seed=1), scale=0.3, window=window, cap=cap)


@pytest.mark.parametrize("block_size", [8, 16])
def test_bf16_cache_matches_reference(paged_batch, block_size):
    check(*paged_batch(ragged(block_size), 9, 3, 64, block_size, kv_dtype=torch.bfloat16, seed=2))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_int8_cache_matches_reference(paged_batch, head_dim, group, block_size):
    """The reference reads the same int8 rows dequantized; writes must quantize bit for bit alike."""
    check(*paged_batch(ragged(block_size), group * 2, 2, head_dim, block_size, kv_dtype=torch.int8, seed=group))


@pytest.mark.parametrize("window, cap", [(None, None), (7, None), (None, 30.0), (300, None)])
def test_int8_cache_on_the_avx512_kernel_matches_reference(paged_batch, window, cap):
    """The kernel CPUs without AMX take (and batch-invariant prompts on any): dequantized exactly."""
    n = 256
    q, k, v, kv, meta = paged_batch([(2 * n + 37, 1), (n + 1, 1), (5, 1), (40, 40), (70, 33)], 9, 3, 64, 16,
                                    kv_dtype=torch.int8, seed=11)
    want = REF.attention(q, k, v, kv.clone(), meta, 0.125, window, cap)
    for threads in (1, 2):
        out, cache = np.empty(q.shape, np.float32), kv.clone()
        paged_attention_step(out, q.numpy(), k.numpy(), v.numpy(), cache.numpy(), meta.slot_mapping.numpy(),
                             meta.query_start_loc.numpy(), meta.seq_lens.numpy(), meta.block_tables.numpy(),
                             0.125, window or 0, cap or 0.0, 16, threads)
        torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5)


def test_bf16_queries_are_converted_at_the_edge(paged_batch):
    check(*paged_batch(ragged(16), 8, 2, 64, 16, seed=3), q_dtype=torch.bfloat16)


def test_prompts_only_and_decodes_only_steps(paged_batch):
    check(*paged_batch([(50, 50), (70, 33)], 6, 2, 64, 16, seed=5))
    check(*paged_batch([(50, 1), (17, 1), (16, 1)], 6, 2, 64, 16, seed=6))


def test_long_prefill_splits_into_tiles_and_threads_agree(paged_batch):
    q, k, v, kv, meta = paged_batch([(150, 130), (40, 1)], 8, 2, 64, 16, seed=4)
    outs = []
    for threads, q_tile in [(1, 16), (2, 16), (2, 7)]:
        out, cache = np.empty(q.shape, np.float32), kv.clone()
        paged_attention_step(out, q.numpy(), k.numpy(), v.numpy(), cache.numpy(), meta.slot_mapping.numpy(),
                             meta.query_start_loc.numpy(), meta.seq_lens.numpy(), meta.block_tables.numpy(),
                             0.125, 0, 0.0, q_tile, threads)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1]), "the thread count must not change the result"
    want = REF.attention(q, k, v, kv.clone(), meta, 0.125)
    torch.testing.assert_close(torch.from_numpy(outs[2]), want, rtol=1e-5, atol=1e-5)


def test_write_kv_rounds_to_bf16_like_torch_and_skips_padding():
    k = torch.randn(5, 2, 32) * torch.logspace(-30, 30, 32)
    k[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    v = -k
    cache = torch.zeros(2, 3, 2, 4, 32, dtype=torch.bfloat16)
    slots = torch.tensor([0, 5, -1, 11, 2])
    write_kv(cache.view(torch.uint16).numpy(), k.numpy(), v.numpy(), slots.numpy())
    flat = cache.permute(0, 1, 3, 2, 4).reshape(2, 12, 2, 32)
    keep = slots >= 0
    torch.testing.assert_close(flat[0, slots[keep]], k[keep].bfloat16(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slots[keep]], v[keep].bfloat16(), equal_nan=True, rtol=0, atol=0)
    assert flat[:, [1, 3, 4, 6, 7, 8, 9, 10]].float().abs().sum() == 0


def test_write_kv_quantizes_int8_rows_like_the_reference_and_skips_padding():
    """Codes and scale per (token, head) row, bit for bit ``quant.kv_int8``'s; zero rows get scale 0."""
    k = torch.randn(5, 2, 64) * torch.logspace(-20, 20, 5)[:, None, None]
    k[1, 1] = 0.0
    k[3, 0, 7] = 1e4  # one outlier sets its row's scale
    v = -k
    cache = torch.zeros(2, 3, 2, 4, 68, dtype=torch.int8)
    slots = torch.tensor([0, 5, -1, 11, 2])
    write_kv(cache.numpy(), k.numpy(), v.bfloat16().view(torch.uint16).numpy(), slots.numpy())
    flat = cache.permute(0, 1, 3, 2, 4).reshape(2, 12, 2, 68)
    keep = slots >= 0
    assert torch.equal(flat[0, slots[keep]], quantize_kv_rows(k[keep]))
    assert torch.equal(flat[1, slots[keep]], quantize_kv_rows(v[keep].bfloat16()))
    assert torch.equal(dequantize_kv_rows(flat[0, 5, 1]), torch.zeros(64))
    back = dequantize_kv_rows(flat[0, slots[keep]])
    assert ((back - k[keep]).abs() <= k[keep].abs().amax(-1, keepdim=True) / 254 * 1.0001).all()
    assert flat[:, [1, 3, 4, 6, 7, 8, 9, 10]].abs().sum() == 0


@pytest.mark.parametrize("window", [None, 300])
def test_long_decodes_split_across_threads_and_merge(paged_batch, window):
    """Contexts past DECODE_KEYS_PER_ITEM keys are attended in ranges and merged (flash-decoding)."""
    from edgellm.kernels.cpu.paged_attention import DECODE_KEYS_PER_ITEM

    n = DECODE_KEYS_PER_ITEM
    check(*paged_batch([(2 * n + 37, 1), (n + 1, 1), (n, 1), (3 * n, 1)], 9, 3, 64, 16, seed=7), window=window)
    check(*paged_batch([(2 * n + 37, 1), (60, 60)], 6, 2, 64, 16, seed=8), window=window)
    check(*paged_batch([(2 * n + 37, 1), (n + 1, 1), (60, 60)], 9, 3, 64, 16, kv_dtype=torch.int8, seed=8),
          window=window)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_many_decodes_dealt_a_sequence_at_a_time_match_the_reference(paged_batch, kv_dtype):
    """Enough decodes (long ones split into key ranges) for ``heads_unit`` to deal each sequence's kv
    heads to one thread together, on every decode kernel: the reference's numbers."""
    from edgellm.kernels.cpu.paged_attention import DECODE_KEYS_PER_ITEM

    n = DECODE_KEYS_PER_ITEM
    seqs = [(c, 1) for c in (3, 17, 40, 100, 2 * n + 37, 160, 300, 9, 64, n + 1, 3 * n, 77)]
    check(*paged_batch(seqs, 9, 3, 64, 16, kv_dtype=kv_dtype, seed=11))


def test_long_decodes_split_into_equal_whole_tile_ranges():
    """A context splits into ctx // 256 ranges of equal size (whole 16-key tiles, the last shorter):
    no short tail item, none past DECODE_MAX_KEYS, and together they cover the keys exactly."""
    from edgellm.kernels.cpu.paged_attention import DECODE_KEYS_PER_ITEM, DECODE_MAX_KEYS, _plan

    cases = [(1, 0, 1), (255, 0, 1), (256, 0, 1), (257, 0, 1), (511, 0, 1), (512, 0, 2), (600, 0, 2), (767, 0, 2),
             (768, 0, 3), (4000, 0, 15), (8000, 0, 30), (900, 300, 1)]
    cases += [(ctx, 0, None) for ctx in range(200, 20000, 97)]
    for ctx, window, want_parts in cases:
        items, _, partials = _plan(np.array([0, 1]), np.array([ctx]), 1, 16, window, 3, 64)
        ranges = sorted((int(a), int(b)) for a, b in items[:, 4:6])
        lo = max(0, ctx - window) if window else 0
        assert len(ranges) == (want_parts or len(ranges)) == (partials.shape[0] or 1)
        assert ranges[0][0] == lo and ranges[-1][1] == ctx
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) <= DECODE_MAX_KEYS and len(set(sizes[:-1])) <= 1 and 0 < sizes[-1] <= sizes[0]
        if len(ranges) > 1:
            assert sizes[0] % 16 == 0 and sizes[0] >= DECODE_KEYS_PER_ITEM


def test_a_sequences_head_items_are_dealt_to_one_worker_together():
    """With four or more (sequence, key range) groups a worker, ``heads_unit`` deals a group's kv-head
    items to one worker back to back (their blocks' K and V pieces are adjacent in the cache); with
    fewer, items one by one for balance. Either way every item is dealt exactly once."""
    from edgellm.kernels.cpu.paged_attention import _plan, dealt_items, heads_unit

    rng = np.random.default_rng(0)
    grouped = 0
    for _ in range(200):
        n, n_kv, workers = int(rng.integers(1, 40)), int(rng.choice([1, 2, 3, 4])), int(rng.choice([1, 2, 3]))
        lens = rng.integers(1, 1300, n)
        nq = np.where(rng.random(n) < 0.2, np.minimum(lens, rng.integers(2, 200, n)), 1)
        starts = np.concatenate([[0], np.cumsum(nq)])
        items, order, _ = _plan(starts, lens, n_kv, 64, 0, 2, 64)
        unit = heads_unit(order.shape[0], n_kv, workers)
        dealt = [dealt_items(order, w, workers, unit) for w in range(workers)]
        assert sorted(np.concatenate(dealt).tolist()) == list(range(items.shape[0]))
        groups = order.shape[0] // n_kv
        assert unit == (n_kv if n_kv > 1 and groups >= 4 * workers else 1)
        for mine in dealt:
            assert mine.shape[0] % unit == 0
            for i in range(0, mine.shape[0], unit):
                assert len(set(items[mine[i:i + unit], 0].tolist())) == 1, "a unit spans sequences"
        grouped += unit > 1
    assert grouped > 50


def test_metadata_without_host_lists_reads_the_tensors(paged_batch):
    import dataclasses

    q, k, v, kv, meta = paged_batch(ragged(16), 6, 2, 64, 16, seed=9)
    bare = dataclasses.replace(meta, query_start_loc_list=[], seq_lens_list=[])
    for backend in (CPU, INVARIANT):
        backend.begin_step(meta)
        want = backend.attention(q, k, v, kv.clone(), meta, 0.125)
        got = backend.attention(q, k, v, kv.clone(), bare, 0.125)
        assert torch.equal(got, want)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_v_as_a_bf16_view_of_the_projection_equals_v_widened_first(paged_batch, kv_dtype):
    """The model hands attention float32 q, k (rotated) and v as a strided bf16 view of the qkv
    output; the kernels widen v as they store it: same cache bits and output as a float32 v."""
    q, k, v, kv, meta = paged_batch(ragged(16), 6, 2, 64, 16, kv_dtype=kv_dtype, seed=7)
    t = q.shape[0]
    qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=1).to(torch.bfloat16)
    v_view = qkv[:, -v[0].numel():].view(t, *v.shape[1:])
    assert not v_view.is_contiguous()
    for backend in (CPU, INVARIANT):
        kv_view, kv_wide = kv.clone(), kv.clone()
        backend.begin_step(meta)
        got = backend.attention(q, k, v_view, kv_view, meta, 0.125)
        want = backend.attention(q, k, v_view.float().contiguous(), kv_wide, meta, 0.125)
        assert got.dtype == torch.bfloat16
        assert torch.equal(kv_view, kv_wide)
        assert torch.equal(got, want.to(torch.bfloat16))
