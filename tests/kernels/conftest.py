"""Shared builders for kernel tests: ragged paged-attention batches over a shuffled block pool."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from edgellm.backends.base import AttentionMetadata
from edgellm.quant.kv_int8 import quantize_kv_rows

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]


def make_batch(seqs: list[tuple[int, int]], n_heads: int, n_kv: int, head_dim: int, block_size: int,
               kv_dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    """``seqs`` is ``[(context length after this step, new tokens)]``; earlier context is random data
    already in the cache, blocks are drawn from a shuffled pool (with spare blocks holding garbage).
    An int8 cache holds the random values quantized, with their scales (``quant.kv_int8``)."""
    g = torch.Generator().manual_seed(seed)
    needed = [(ctx + block_size - 1) // block_size for ctx, _ in seqs]
    n_blocks = sum(needed) + 5
    kv = torch.randn(2, n_blocks, n_kv, block_size, head_dim, generator=g)
    kv = quantize_kv_rows(kv) if kv_dtype == torch.int8 else kv.to(kv_dtype)
    pool = torch.randperm(n_blocks, generator=g)
    tables = torch.zeros(len(seqs), max(needed) + 2, dtype=torch.int32)  # padded wider than needed
    slots, starts, used = [], [0], 0
    for i, ((ctx, nq), nb) in enumerate(zip(seqs, needed)):
        ids = pool[used:used + nb]
        used += nb
        tables[i, :nb] = ids
        slots += [int(ids[p // block_size]) * block_size + p % block_size for p in range(ctx - nq, ctx)]
        starts.append(starts[-1] + nq)
    lens = [ctx for ctx, _ in seqs]
    decodes = 0  # leading one-token sequences count as generated tokens, as the engine lays them out
    while decodes < len(seqs) and seqs[decodes][1] == 1:
        decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=tables, block_size=block_size, max_query_len=max(nq for _, nq in seqs),
        max_seq_len=max(lens), num_decode_tokens=decodes, query_start_loc_list=starts, seq_lens_list=lens,
    )
    t = starts[-1]
    q = torch.randn(t, n_heads, head_dim, generator=g)
    k = torch.randn(t, n_kv, head_dim, generator=g)
    v = torch.randn(t, n_kv, head_dim, generator=g)
    return q, k, v, kv, meta


@pytest.fixture
def paged_batch() -> Callable[..., Batch]:
    return make_batch
