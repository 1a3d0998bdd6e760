"""Checks shared by the prompt-chunk attention kernels' tests (AMX, AVX512-BF16): a batch with its
cache written and poisoned where no sequence may read, a float64 reference, and the backend's routing."""
from __future__ import annotations

import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.kernels.cpu.paged_attention import write_kv
from edgellm.quant.kv_int8 import SCALE_BYTES, dequantize_kv_rows
from tests.kernels.conftest import make_batch

TOLERANCE = 2.0 ** -7  # q and the probabilities in bf16 (as the flash attention path takes them), one rounding out


def reference(q, kv, meta, scale):
    """float64 causal attention of every sequence's rows over its cached keys (an int8 cache's
    dequantized)."""
    if kv.dtype == torch.int8:
        kv = dequantize_kv_rows(kv)
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


def poisoned_batch(seqs, n_heads, n_kv, dim, block_size, seed=0, kv_dtype=torch.bfloat16):
    """``(q, kv, meta, out)``: ``make_batch``'s K/V written to the bf16 (or int8) cache, every slot no
    sequence owns set to NaN (int8: NaN scales; a kernel reading one fails the comparison), ``out`` a
    NaN bf16 ``[T, H, D]``."""
    q, k, v, kv, meta = make_batch(seqs, n_heads, n_kv, dim, block_size, kv_dtype, seed=seed)
    poison = (torch.full((SCALE_BYTES // 4,), float("nan")).view(torch.int8) if kv_dtype == torch.int8
              else float("nan"))
    scales = slice(dim, None) if kv_dtype == torch.int8 else slice(None)
    used = {int(b) for s, (ctx, _) in enumerate(seqs) for b in meta.block_tables[s][: -(-ctx // block_size)]}
    for b in set(range(kv.shape[1])) - used:
        kv[:, b, ..., scales] = poison
    for s, (ctx, _) in enumerate(seqs):  # and the slots past each sequence's end
        last = int(meta.block_tables[s][(ctx - 1) // block_size])
        kv[:, last, :, (ctx - 1) % block_size + 1:, scales] = poison
    cache = kv.numpy() if kv_dtype == torch.int8 else kv.view(torch.uint16).numpy()
    write_kv(cache, k.numpy(), v.bfloat16().view(torch.uint16).numpy(), meta.slot_mapping.numpy())
    return q, kv, meta, torch.full((q.shape[0], n_heads, dim), float("nan"), dtype=torch.bfloat16)


def assert_close(out, want) -> None:
    assert ((out.double() - want).abs() <= TOLERANCE * want.abs() + 2e-2).all()


def assert_backend_routes(backend, monkeypatch, kernel_name: str) -> None:
    """A step of one decode and two prompt chunks sends the chunks (sequences 1-3) to
    ``cpu_backend.<kernel_name>`` in one call; a sliding window keeps flash attention."""
    q, k, v, kv, meta = make_batch([(5, 1), (40, 40), (90, 30)], 9, 3, 64, 16, torch.bfloat16, seed=2)
    kernel = getattr(cpu_backend, kernel_name)
    calls = []
    monkeypatch.setattr(cpu_backend, kernel_name, lambda *a: calls.append(a[6:8]) or kernel(*a))
    out = backend.attention(q, k, v.bfloat16(), kv, meta, 0.125)
    assert calls == [(1, 3)]  # the decode row stays with the decode kernel
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and not out.isnan().any()
    assert_close(out, reference(q, kv, meta, 0.125))
    calls.clear()
    backend.attention(q, k, v.bfloat16(), kv, meta, 0.125, sliding_window=8)
    assert calls == []
