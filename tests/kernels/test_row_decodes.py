"""Sequences of a few query rows in a step of decodes (the fed-back token and the speculative drafts
after it) attend row by row on the decode kernels: each row over the keys up to its own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.cpu import CPUBackend
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.amx import request_amx
from edgellm.kernels.cpu.attention_amx import _run_items_amx
from edgellm.kernels.cpu.attention_dpbf16 import _run_items_dp
from edgellm.kernels.cpu.dpbf16 import supported as dpbf16_supported
from edgellm.kernels.cpu.paged_attention import ROW_DECODES, _merge_partials, _plan, _run_items, write_kv
from tests.kernels.conftest import make_batch

REF = TorchBackend()
# decodes of one row, a few rows, rows whose contexts split into key ranges, a sequence too long to
# take row by row (prompt tiles), and rows that start a context
SEQS = [(37, 1), (300, 3), (5, 5), (900, ROW_DECODES), (40, ROW_DECODES + 1), (611, 2)]


def test_plan_gives_each_row_its_own_keys():
    starts = np.array([0, 1, 4, 6])
    lens = np.array([37, 300, 1100])
    items, order, partials = _plan(starts, lens, 2, 16, 0, 3, 64, ROW_DECODES)
    rows = {}
    for it in items:
        b, hk, t0, t1, k0, k1, slot, row = (int(x) for x in it)
        assert t1 == t0 + 1 and row == t0
        rows.setdefault((row, hk), []).append((k0, k1, slot))
    for q0, q1, ctx in [(0, 1, 37), (1, 4, 300), (4, 6, 1100)]:
        for t in range(q0, q1):
            for hk in range(2):
                ranges = sorted(rows[(t, hk)])
                assert ranges[0][0] == 0 and ranges[-1][1] == ctx - (q1 - 1 - t)
                assert all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))
                assert (len(ranges) > 1) == all(s >= 0 for *_, s in ranges)
    assert partials.shape[0] == sum(1 for it in items if it[6] >= 0)
    # without row decodes a several-row sequence is a prompt tile, as before
    items, _, _ = _plan(starts, lens, 2, 16, 0, 3, 64)
    assert sorted(set(int(t) for t in items[:, 7])) == [-1, 0]


def _kernels():
    yield "avx512", torch.float32, lambda *a: _run_items(*a)
    if dpbf16_supported():
        yield "dpbf16", torch.bfloat16, lambda *a: _run_items_dp(*a)
    if request_amx():
        cfg = CPUBackend(threads=1, warmup=False)._amx_config
        yield "amx", torch.bfloat16, lambda *a: _run_items_amx(*a, cfg)


@pytest.mark.parametrize("window", [0, 100])
@pytest.mark.parametrize("workers", [1, 2])
def test_row_decodes_match_the_reference(window, workers):
    for name, kv_dtype, run in _kernels():
        q, k, v, kv, meta = make_batch(SEQS, 9, 3, 64, 16, kv_dtype=kv_dtype, seed=3)
        meta.num_decode_tokens = int(meta.slot_mapping.shape[0])
        want = REF.attention(q, k, v, kv.clone(), meta, 0.125, window or None)
        cache = kv.clone()
        kv_np = cache.view(torch.uint16).numpy() if kv_dtype == torch.bfloat16 else cache.numpy()
        v_np = v.to(kv_dtype).view(torch.uint16).numpy() if kv_dtype == torch.bfloat16 else v.numpy()
        slots, starts = meta.slot_mapping.numpy(), meta.query_start_loc.numpy()
        lens, tables = meta.seq_lens.numpy(), meta.block_tables.numpy()
        write_kv(kv_np, k.numpy(), v_np, slots)
        items, order, partials = _plan(starts, lens, 3, 16, window, 3, 64, ROW_DECODES)
        out = np.zeros(q.shape, np.float32)
        for w in range(workers):
            run(out, q.numpy(), kv_np, starts, lens, tables, 0.125, window, 0.0, items, order, partials, w, workers)
        if partials.shape[0]:
            _merge_partials(out, q.numpy(), items, partials, 3)
        torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5, msg=name)
