"""Prompt-chunk attention on AVX512-BF16 (bf16 and int8 caches) against a float64 reference, and the
backend's choice of it.
Skips on CPUs without AVX512-BF16 (there prompt chunks keep torch's flash attention)."""
from __future__ import annotations

import pytest
import torch

from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.dpbf16 import supported
from edgellm.kernels.cpu.prompt_attention_dp import prompt_attention_dp
from tests.kernels.prompt_attention_checks import (
    assert_backend_routes,
    assert_close,
    poisoned_batch,
    reference,
)

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-BF16")


def run(seqs, n_heads, n_kv, dim, block_size, threads=2, seed=0, kv_dtype=torch.bfloat16):
    q, kv, meta, out = poisoned_batch(seqs, n_heads, n_kv, dim, block_size, seed, kv_dtype)
    scale = dim ** -0.5
    cache = kv.numpy() if kv_dtype == torch.int8 else kv.view(torch.uint16).numpy()
    prompt_attention_dp(out.view(torch.uint16).numpy(), q.numpy(), cache,
                        meta.query_start_loc.numpy(), meta.seq_lens.numpy(), meta.block_tables.numpy(), 0, len(seqs),
                        scale, threads)
    return out, reference(q, kv, meta, scale)


@pytest.mark.parametrize("seqs", [[(1, 1)], [(17, 17)], [(163, 163)], [(300, 100), (50, 50), (700, 130)],
                                  [(65, 2), (129, 129)]])
@pytest.mark.parametrize("n_heads, n_kv, dim, block_size", [(9, 3, 64, 16), (4, 1, 64, 32), (8, 2, 128, 16),
                                                             (8, 8, 64, 16), (16, 2, 64, 16)])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_matches_float64(seqs, n_heads, n_kv, dim, block_size, kv_dtype):
    """An int8 cache's rows are dequantized to bf16 as they are gathered; the reference dequantizes the
    same rows in float64."""
    assert_close(*run(seqs, n_heads, n_kv, dim, block_size, kv_dtype=kv_dtype))


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_numbers(threads):
    seqs = [(200, 200), (90, 40)]
    out, _ = run(seqs, 9, 3, 64, 16, threads=threads, seed=3)
    two, _ = run(seqs, 9, 3, 64, 16, threads=2, seed=3)
    assert torch.equal(out.view(torch.int16), two.view(torch.int16))


def test_the_backend_routes_prompt_chunks_to_the_kernel(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    assert_backend_routes(CPUBackend(threads=2, warmup=False), monkeypatch, "prompt_attention_dp")
