"""A decode's ``p @ V`` (``decode_pv``) against float64, for every register form and the plain loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.kernels.cpu.decode_pv import _decode_pv_loop, decode_pv
from edgellm.quant.kv_int8 import dequantize_kv_rows, quantize_kv_rows


def reference(kv, table, lo, hi, hk, scores, acc0):
    if kv.dtype == np.int8:
        v = dequantize_kv_rows(torch.from_numpy(kv[1])).numpy()
    elif kv.dtype == np.float32:
        v = kv[1].astype(np.float32)
    else:
        v = (kv[1].astype(np.uint32) << 16).view(np.float32)
    rows = np.stack([v[table[j // kv.shape[3]], hk, j % kv.shape[3]] for j in range(lo, hi)]).astype(np.float64)
    return acc0.astype(np.float64) + scores[:, : hi - lo].astype(np.float64) @ rows


def cache(rng, dtype, blocks, n_kv, block_size, dim):
    if dtype == np.uint16:  # bf16 bits of values in [-4, 4]
        x = rng.uniform(-4, 4, (2, blocks, n_kv, block_size, dim)).astype(np.float32)
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    if dtype == np.int8:  # codes and a float32 scale per row
        return quantize_kv_rows(torch.from_numpy(rng.standard_normal((2, blocks, n_kv, block_size, dim)))).numpy()
    return rng.standard_normal((2, blocks, n_kv, block_size, dim)).astype(np.float32)


@pytest.mark.parametrize("dim", [64, 128, 256, 80])  # 80: no register form, the plain loop
@pytest.mark.parametrize("group", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int8])
def test_decode_pv_matches_float64(dim, group, dtype):
    rng = np.random.default_rng(dim * 100 + group)
    block_size, n_kv, blocks = 16, 2, 24
    kv = cache(rng, dtype, blocks, n_kv, block_size, dim)
    table = rng.permutation(blocks).astype(np.int32)
    for lo, hi in [(0, 1), (0, 16), (5, 300), (256, 301), (17, 18)]:  # partial first and last blocks
        scores = rng.random((group, 320)).astype(np.float32)
        acc0 = rng.standard_normal((group, dim)).astype(np.float32)  # adds to what acc holds
        acc = acc0.copy()
        decode_pv(kv, table, lo, hi, 1, scores, acc)
        want = reference(kv, table, lo, hi, 1, scores, acc0)
        np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_decode_pv_register_forms_equal_the_loop_up_to_rounding():
    rng = np.random.default_rng(7)
    kv = cache(rng, np.uint16, 8, 1, 32, 64)
    table = np.arange(8, dtype=np.int32)
    scores = rng.random((3, 256)).astype(np.float32)
    fast, loop = np.zeros((3, 64), np.float32), np.zeros((3, 64), np.float32)
    decode_pv(kv, table, 3, 250, 0, scores, fast)
    _decode_pv_loop(kv, table, 3, 250, 0, scores, loop)
    np.testing.assert_allclose(fast, loop, rtol=1e-5, atol=1e-5 * np.abs(loop).max())
    assert not np.array_equal(fast, np.zeros_like(fast))
