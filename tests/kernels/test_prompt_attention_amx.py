"""Prompt-chunk attention on AMX tiles against a float64 reference, and the backend's choice of it.
Skips on CPUs without AMX (there prompt chunks take the AVX512-BF16 kernel or torch's flash attention)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.amx import make_config, request_amx
from edgellm.kernels.cpu.prompt_attention_amx import prompt_attention_amx
from edgellm.kernels.cpu.softmax16 import softmax_row
from tests.kernels.prompt_attention_checks import (
    assert_backend_routes,
    assert_close,
    poisoned_batch,
    reference,
)

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX")


def run(seqs, n_heads, n_kv, block_size, threads=2, seed=0, kv_dtype=torch.bfloat16):
    q, kv, meta, out = poisoned_batch(seqs, n_heads, n_kv, 64, block_size, seed, kv_dtype)
    scale = 64 ** -0.5
    cache = kv.numpy() if kv_dtype == torch.int8 else kv.view(torch.uint16).numpy()
    prompt_attention_amx(out.view(torch.uint16).numpy(), q.numpy(), cache,
                         meta.query_start_loc.numpy(), meta.seq_lens.numpy(), meta.block_tables.numpy(), 0, len(seqs),
                         scale, make_config(), threads)
    return out, reference(q, kv, meta, scale)


@pytest.mark.parametrize("seqs", [[(1, 1)], [(17, 17)], [(163, 163)], [(300, 100), (50, 50), (700, 130)],
                                  [(65, 2), (129, 129)], [(33, 33), (16, 16), (31, 31)]])
@pytest.mark.parametrize("n_heads, n_kv, block_size", [(9, 3, 16), (4, 1, 32), (8, 8, 16), (16, 2, 16), (6, 2, 8)])
def test_matches_float64(seqs, n_heads, n_kv, block_size):
    assert_close(*run(seqs, n_heads, n_kv, block_size))


@pytest.mark.parametrize("seqs", [[(1, 1)], [(163, 163)], [(300, 100), (50, 50), (700, 130)], [(65, 2), (129, 129)]])
@pytest.mark.parametrize("n_heads, n_kv, block_size", [(9, 3, 16), (4, 1, 32), (6, 2, 8)])
def test_int8_cache_matches_float64(seqs, n_heads, n_kv, block_size):
    """int8 rows dequantized into bf16 tiles: the reference reads the same rows dequantized."""
    assert_close(*run(seqs, n_heads, n_kv, block_size, kv_dtype=torch.int8))


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_numbers(threads):
    seqs = [(200, 200), (90, 40)]
    out, _ = run(seqs, 9, 3, 16, threads=threads, seed=3)
    two, _ = run(seqs, 9, 3, 16, threads=2, seed=3)
    assert torch.equal(out.view(torch.int16), two.view(torch.int16))


@pytest.mark.parametrize("limit, width", [(1, 16), (5, 32), (16, 16), (17, 32), (100, 128), (300, 320)])
def test_softmax_row_matches_numpy(limit, width):
    from numba import njit

    @njit
    def call(s, row, limit, width):
        return softmax_row(s, row, limit, width)

    rng = np.random.default_rng(limit)
    s = (rng.standard_normal(3 * width) * 30).astype(np.float32)
    s[width + limit - 1] = 0.0
    want = s[width:width + limit].astype(np.float64)
    want = np.exp(want - want.max())
    got = s.copy()
    total = call(got, width, limit, width)
    # x - max rounds to float32 first: at x = -70 that alone is ~4e-6 of exp(x)
    assert np.allclose(got[width:width + limit], want, rtol=1e-5, atol=1e-38)
    assert (got[width + limit:2 * width] == 0).all()
    assert np.array_equal(got[:width], s[:width]) and np.array_equal(got[2 * width:], s[2 * width:])
    assert abs(total - want.sum()) <= 1e-5 * want.sum()


def test_the_backend_routes_prompt_chunks_to_the_kernel(monkeypatch):
    assert_backend_routes(CPUBackend(threads=2, warmup=False), monkeypatch, "prompt_attention_amx")
