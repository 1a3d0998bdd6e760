"""Numba Q8_0 kernels against the reference dequantize-then-matmul and row dequantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.kernels.cpu.q8_0 import q8_0_dequantize, q8_0_matmul, q8_0_rows, q8_0_rows_raw, repack_q8_0
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows


def q8_weight(n: int, k: int, seed: int = 0) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block: scale 0
    w[1, :32] *= 1e-4  # tiny weights: half-precision subnormal scales
    return QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k))


@pytest.mark.parametrize("n, k", [(576, 1536), (1536, 576), (200, 96)])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_matches_dequantize_then_linear(n, k, m, threads):
    wq = q8_weight(n, k)
    qs, d = repack_q8_0(wq.data.numpy())
    x = torch.randn(m, k)
    y = np.empty((m, n), np.float32)
    q8_0_matmul(x.numpy(), qs, d, y, threads)
    want = x @ wq.dequantize().t()
    torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_matmul_lm_head_shape_quick_subset():
    wq = q8_weight(49152, 576)
    qs, d = repack_q8_0(wq.data.numpy())
    x = torch.randn(2, 576)
    y = np.empty((2, 49152), np.float32)
    q8_0_matmul(x.numpy(), qs, d, y, 2)
    rows = torch.arange(0, 49152, 97)
    want = x @ wq.rows(rows).t()
    torch.testing.assert_close(torch.from_numpy(y[:, rows.numpy()]), want, rtol=1e-5, atol=1e-6)


def test_repack_rows_and_dequantize_are_exact():
    wq = q8_weight(300, 128, seed=1)
    qs, d = repack_q8_0(wq.data.numpy())
    full = wq.dequantize()
    ids = torch.tensor([0, 1, 299, 7, 7, 150])
    got, raw = np.empty((6, 128), np.float32), np.empty((6, 128), np.float32)
    q8_0_rows(qs, d, ids.numpy(), got)
    q8_0_rows_raw(wq.data.numpy(), ids.numpy(), raw)
    assert torch.equal(torch.from_numpy(got), full[ids])
    assert torch.equal(torch.from_numpy(raw), full[ids])
    tile = np.empty((50, 128), np.float32)
    q8_0_dequantize(qs, d, 100, tile)
    assert torch.equal(torch.from_numpy(tile), full[100:150])


def test_raw_rows_widen_every_half_scale_exactly():
    """Every finite float16 as a block scale (with q = 1) must come back bit-exact."""
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[torch.isfinite(halves)]
    raw = torch.zeros(halves.numel(), 34, dtype=torch.uint8)
    raw[:, :2] = halves.view(torch.uint8).reshape(-1, 2)
    raw[:, 2] = 1
    out = np.empty((halves.numel(), 32), np.float32)
    q8_0_rows_raw(raw.numpy(), np.arange(halves.numel()), out)
    assert torch.equal(torch.from_numpy(out[:, 0]), halves.float())


def test_row_int8_requantization_is_the_float64_reference():
    """The int8 copy of a head: torch's float64 arithmetic, written out, gives the same bits."""
    from edgellm.backends.cpu_weights import RowInt8Head

    w = torch.randn(300, 576, generator=torch.Generator().manual_seed(3)) * 0.05
    w[7] = 0.0  # an all-zero row: scale 0, every q 0
    qs, d = repack_q8_0(quantize_rows("Q8_0", w).numpy())
    head = RowInt8Head.from_q8_0(qs, d)
    wd = torch.from_numpy(qs).double() * torch.from_numpy(d).double().repeat_interleave(32, dim=1)
    scale = (wd.abs().amax(1) / 127).to(torch.bfloat16)
    s64 = scale.double()
    q = torch.where(s64[:, None] > 0, (wd / s64.clamp_min(1e-30)[:, None]).round(), 0.0).clamp(-127, 127)
    approx = q * s64[:, None]
    assert torch.equal(head.qw, q.to(torch.int8))
    assert torch.equal(head.scale.view(torch.int16), scale.view(torch.int16))
    for got, exact in ((head.err_norm, (wd - approx).norm(dim=1)), (head.w_norm, approx.norm(dim=1))):
        assert (got.astype(np.float64) >= exact.numpy()).all()  # rounded up: a bound, never below
        assert (got == np.nextafter(exact.numpy().astype(np.float32), np.float32(np.inf))).all()


@pytest.mark.parametrize("n, k", [(2, 32), (200, 96), (576, 1536)])
def test_repack_splits_blocks_into_quants_and_scales(n, k):
    """Block ``b`` of row ``r``: bytes 0-1 are the float16 scale, bytes 2-33 the 32 quants."""
    raw = q8_weight(n, k).data.numpy()
    qs, d = repack_q8_0(raw)
    blocks = raw.reshape(n, k // 32, 34)
    assert qs.dtype == np.int8 and qs.shape == (n, k) and qs.flags.c_contiguous
    assert np.array_equal(qs.view(np.uint8), blocks[:, :, 2:].reshape(n, k))
    assert np.array_equal(d, blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32))
