"""Prompt-chunk attention on AVX512-BF16 against a float64 reference, and the backend's choice of it.
Skips on CPUs without AVX512-BF16 (there prompt chunks keep torch's flash attention)."""
from __future__ import annotations

import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.dpbf16 import supported
from edgellm.kernels.cpu.paged_attention import write_kv
from edgellm.kernels.cpu.prompt_attention_dp import prompt_attention_dp
from tests.kernels.conftest import make_batch

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-BF16")


def reference(q, kv, meta, scale):
    """float64 causal attention of every sequence's rows over its cached keys."""
    n_heads, n_kv, dim = q.shape[1], kv.shape[2], kv.shape[4]
    outs = []
    for s, ctx in enumerate(meta.seq_lens_list):
        q0, q1 = meta.query_start_loc_list[s], meta.query_start_loc_list[s + 1]
        blocks = meta.block_tables[s][: -(-ctx // kv.shape[3])].long()
        k, v = (kv[p, blocks].transpose(0, 1).reshape(n_kv, -1, dim)[:, :ctx].double()
                .repeat_interleave(n_heads // n_kv, 0) for p in (0, 1))
        scores = q[q0:q1].double().transpose(0, 1) @ k.transpose(1, 2) * scale
        pos = torch.arange(ctx - (q1 - q0), ctx)[:, None]
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf"))
        outs.append((torch.softmax(scores, -1) @ v).transpose(0, 1))
    return torch.cat(outs)


def run(seqs, n_heads, n_kv, dim, block_size, threads=2, seed=0):
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
    prompt_attention_dp(out.view(torch.uint16).numpy(), q.numpy(), kv_np, meta.query_start_loc.numpy(),
                        meta.seq_lens.numpy(), meta.block_tables.numpy(), 0, len(seqs), scale, threads)
    return out, reference(q, kv, meta, scale)


@pytest.mark.parametrize("seqs", [[(1, 1)], [(17, 17)], [(163, 163)], [(300, 100), (50, 50), (700, 130)],
                                  [(65, 2), (129, 129)]])
@pytest.mark.parametrize("n_heads, n_kv, dim, block_size", [(9, 3, 64, 16), (4, 1, 64, 32), (8, 2, 128, 16),
                                                             (8, 8, 64, 16), (16, 2, 64, 16)])
def test_matches_float64(seqs, n_heads, n_kv, dim, block_size):
    out, want = run(seqs, n_heads, n_kv, dim, block_size)
    # q and the probabilities in bf16 (as the flash attention path takes them), the output rounded once
    assert ((out.double() - want).abs() <= 2.0 ** -7 * want.abs() + 2e-2).all()


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_numbers(threads):
    seqs = [(200, 200), (90, 40)]
    out, _ = run(seqs, 9, 3, 64, 16, threads=threads, seed=3)
    two, _ = run(seqs, 9, 3, 64, 16, threads=2, seed=3)
    assert torch.equal(out.view(torch.int16), two.view(torch.int16))


def test_the_backend_routes_prompt_chunks_to_the_kernel(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    backend = CPUBackend(threads=2, warmup=False)
    q, k, v, kv, meta = make_batch([(5, 1), (40, 40), (90, 30)], 9, 3, 64, 16, torch.bfloat16, seed=2)
    calls = []
    monkeypatch.setattr(cpu_backend, "prompt_attention_dp",
                        lambda *a: calls.append(a[6:8]) or prompt_attention_dp(*a))
    out = backend.attention(q, k, v.bfloat16(), kv, meta, 0.125)
    assert calls == [(1, 3)]  # the decode row stays with the decode kernel
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and not out.isnan().any()
    want = reference(q, kv, meta, 0.125)
    assert ((out.double() - want).abs() <= 2.0 ** -7 * want.abs() + 2e-2).all()
    calls.clear()
    backend.attention(q, k, v.bfloat16(), kv, meta, 0.125, sliding_window=8)  # windows keep flash attention
    assert calls == []
