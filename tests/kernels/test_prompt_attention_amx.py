"""Prompt-chunk attention on AMX tiles against a float64 reference, and the backend's choice of it.
Skips on CPUs without AMX (there prompt chunks take the AVX512-BF16 kernel or torch's flash attention)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.amx import make_config, request_amx
from edgellm.kernels.cpu.paged_attention import write_kv
from edgellm.kernels.cpu.prompt_attention_amx import prompt_attention_amx
from edgellm.kernels.cpu.softmax16 import softmax_row
from tests.kernels.conftest import make_batch
from tests.kernels.test_prompt_attention_dp import reference

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX")


def run(seqs, n_heads, n_kv, block_size, threads=2, seed=0):
    dim = 64
    q, k, v, kv, meta = make_batch(seqs, n_heads, n_kv, dim, block_size, torch.bfloat16, seed=seed)
    used = {int(b) for s, (ctx, _) in enumerate(seqs) for b in meta.block_tables[s][: -(-ctx // block_size)]}
    for b in set(range(kv.shape[1])) - used:
        kv[:, b] = float("nan")  # blocks no sequence owns: never read
    for s, (ctx, _) in enumerate(seqs):  # and the slots past each sequence's end
        last = int(meta.block_tables[s][(ctx - 1) // block_size])
        kv[:, last, :, (ctx - 1) % block_size + 1:] = float("nan")
    kv_np = kv.view(torch.uint16).numpy()
    write_kv(kv_np, k.numpy(), v.bfloat16().view(torch.uint16).numpy(), meta.slot_mapping.numpy())
    out = torch.full((q.shape[0], n_heads, dim), float("nan"), dtype=torch.bfloat16)
    scale = dim ** -0.5
    prompt_attention_amx(out.view(torch.uint16).numpy(), q.numpy(), kv_np, meta.query_start_loc.numpy(),
                         meta.seq_lens.numpy(), meta.block_tables.numpy(), 0, len(seqs), scale, make_config(), threads)
    return out, reference(q, kv, meta, scale)


@pytest.mark.parametrize("seqs", [[(1, 1)], [(17, 17)], [(163, 163)], [(300, 100), (50, 50), (700, 130)],
                                  [(65, 2), (129, 129)], [(33, 33), (16, 16), (31, 31)]])
@pytest.mark.parametrize("n_heads, n_kv, block_size", [(9, 3, 16), (4, 1, 32), (8, 8, 16), (16, 2, 16), (6, 2, 8)])
def test_matches_float64(seqs, n_heads, n_kv, block_size):
    out, want = run(seqs, n_heads, n_kv, block_size)
    # q and the probabilities in bf16 (as the flash attention path takes them), the output rounded once
    assert ((out.double() - want).abs() <= 2.0 ** -7 * want.abs() + 2e-2).all()


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
    backend = CPUBackend(threads=2, warmup=False)
    q, k, v, kv, meta = make_batch([(5, 1), (40, 40), (90, 30)], 9, 3, 64, 16, torch.bfloat16, seed=2)
    calls = []
    monkeypatch.setattr(cpu_backend, "prompt_attention_amx",
                        lambda *a: calls.append(a[6:8]) or prompt_attention_amx(*a))
    out = backend.attention(q, k, v.bfloat16(), kv, meta, 0.125)
    assert calls == [(1, 3)]  # the decode row stays with the decode kernel
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and not out.isnan().any()
    want = reference(q, kv, meta, 0.125)
    assert ((out.double() - want).abs() <= 2.0 ** -7 * want.abs() + 2e-2).all()
    calls.clear()
    backend.attention(q, k, v.bfloat16(), kv, meta, 0.125, sliding_window=8)  # windows keep flash attention
    assert calls == []
