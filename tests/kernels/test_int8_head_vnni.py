"""The AVX512-VNNI byte head (``int8_head_vnni``): the activations' groups as it reports them, exact
integer sums folded in float32, any row and column count, and greedy steps through it keeping the
exact argmax. Skips on CPUs without AVX512-VNNI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.kernels.cpu.int8_gemv import supported
from edgellm.kernels.cpu.int8_head_vnni import GROUP, int8_head_vnni, quantize_groups, vnni_panels
from tests.kernels.int8_head_checks import assert_greedy_head_exact, assert_matches_float64

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-VNNI")


def test_quantize_groups_reports_what_it_rounded_to():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g)
    x[1, :32] = 0.0  # an all-zero group
    x[2, 40] = 300.0  # an outlier coarsens its own group only
    xq, s, off, used = quantize_groups(x.numpy())
    assert np.abs(xq).max() <= 127 and s.shape == (5, 96 // GROUP)
    groups = torch.from_numpy(xq).view(5, -1, GROUP).long()
    assert np.array_equal(off, (-128 * groups.sum(-1)).numpy())
    scales = torch.from_numpy(s).double()[:, :, None]
    assert torch.equal(torch.from_numpy(used).view(5, -1, GROUP), (groups * scales).float())
    assert ((torch.from_numpy(used).double() - x.double()).view(5, -1, GROUP).abs() <= 0.51 * scales).all()
    assert s[2, 1] > 100 * s[2, 0] and (used[1, :32] == 0).all()


def test_panels_hold_the_weights_plus_128_in_fours():
    qw = torch.randint(-127, 128, (50, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    panels = vnni_panels(qw.numpy())
    assert panels.shape == (2, 16, 48, 4) and panels.dtype == np.uint8
    assert panels[1, 3, 1, 2] == int(qw[49, 14]) + 128
    assert (panels[1, :, 2:] == 128).all()  # columns past N weigh nothing


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 33])
@pytest.mark.parametrize("n, k", [(16, 32), (100, 576), (1000, 64), (96, 2048)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_of_the_quantized_rows(m, n, k, threads):
    g = torch.Generator().manual_seed(m * 7 + n)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    qw[0], qw[-1] = 127, -127  # the largest sums: must not overflow int32
    scale = torch.rand(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    x[0] = x[0].abs()
    xq, s, off, used = quantize_groups(x.numpy())
    out = np.full((m, n), np.nan, np.float32)
    int8_head_vnni(xq, s, off, vnni_panels(qw.numpy()), scale.numpy(), out, threads)
    assert_matches_float64(out, torch.from_numpy(used), qw, scale)


@pytest.mark.parametrize("m", [cpu_backend.VNNI_HEAD_MIN_ROWS, 32, 40])
def test_greedy_steps_through_the_byte_head_keep_the_exact_argmax(m, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")  # with AMX, the AMX head takes these rows
    assert_greedy_head_exact(m, monkeypatch, "int8_head_vnni")


def test_rows_with_too_many_candidates_are_left_to_the_caller():
    """``max_candidates``: a flat row (coarse activations, thousands of near-ties) comes back as it was
    with ``best`` -1; every other row as without the cap."""
    from edgellm.backends.cpu import CPUBackend
    from edgellm.kernels.cpu.q8_0 import q8_0_rescore
    from edgellm.quant import QuantizedTensor
    from edgellm.quant.formats import quantize_rows

    n, k = 4096, 576
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::32] = 0.0  # the channels of row 1's outliers weigh nothing
    q8 = QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k))
    weight = CPUBackend(threads=2, warmup=False).prepare_weight(q8, torch.float32, "lm_head")
    head = weight.argmax_head
    x = torch.randn(6, k, generator=g) * 0.1
    x[::2] += q8.dequantize()[:3] * 3  # rows 0, 2, 4: one clear maximum
    x[1, ::32] = 10.0  # an outlier in every group coarsens its int8 steps: a loose bound, a flat row
    xf = x.numpy()
    _, _, _, used = quantize_groups(xf)
    approx = (torch.from_numpy(used) @ (head.qw.float() * head.scale.float()[:, None]).t()).contiguous()

    def rescore(cap):
        logits, best = approx.clone(), np.empty(6, np.int64)
        n_done = q8_0_rescore(xf, used, weight.qs, weight.d, head.err_norm, head.w_norm, n, logits.numpy(), best, cap)
        return logits, best, n_done

    full, full_best, _ = rescore(0)
    capped, capped_best, _ = rescore(64)
    flat = capped_best < 0
    assert flat[1] and not flat[::2].any()
    assert torch.equal(capped[torch.from_numpy(flat)], approx[torch.from_numpy(flat)])
    assert np.array_equal(capped_best[~flat], full_best[~flat])
    assert torch.equal(capped[torch.from_numpy(~flat)], full[torch.from_numpy(~flat)])
    assert np.array_equal(full_best, (x.double() @ q8.dequantize().double().t()).argmax(-1).numpy())


@pytest.mark.parametrize("m", [cpu_backend.VNNI_HEAD_MIN_ROWS, 40])
def test_flat_rows_are_redone_with_int16_activations_and_keep_the_exact_argmax(m, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setattr(cpu_backend, "RESCORE_MAX_CANDIDATES", 1)  # every row with a near-tie falls back
    gemv_rows = []
    gemv = cpu_backend.int8_gemv
    monkeypatch.setattr(cpu_backend, "int8_gemv", lambda *a: gemv_rows.append(a[0].shape[0]) or gemv(*a))
    assert_greedy_head_exact(m, monkeypatch, "int8_head_vnni")
    assert gemv_rows and max(gemv_rows) <= cpu_backend.INT8_GEMV_MAX_ROWS


@pytest.mark.parametrize("n, valid", [(96, 96), (100, 100), (100, 90), (150, 40)])
def test_the_screen_bounds_each_panel_as_it_stores_it(n, valid):
    """With ``screen``, the logits are the same and each 48-column panel's largest lower and upper
    bound (``head_screen``) is that of its stored logits, over the columns below ``valid`` only; a
    panel past them screens to -inf. ``q8_0_rescore_screened`` then finds what ``q8_0_rescore`` does."""
    from edgellm.kernels.cpu.head_screen import COLS
    from edgellm.kernels.cpu.q8_0 import (
        APPROX_OUT_REL,
        q8_0_rescore,
        q8_0_rescore_screened,
        repack_q8_0,
        row_norms,
    )
    from edgellm.quant.formats import quantize_rows

    m, k = 9, 576
    g = torch.Generator().manual_seed(n + valid)
    w = torch.randn(n, k, generator=g) * 0.05
    qs, d = repack_q8_0(quantize_rows("Q8_0", w).numpy())
    wq = torch.from_numpy(qs).float() * torch.from_numpy(d).repeat_interleave(32, 1)
    qw = torch.clamp(torch.round(wq / (wq.abs().amax(1, keepdim=True) / 127)), -127, 127).to(torch.int8)
    scale = (wq.abs().amax(1) / 127).float()
    err_norm = ((wq - qw.float() * scale[:, None]).norm(dim=1) * 1.01).numpy()
    w_norm = ((qw.float() * scale[:, None]).norm(dim=1) * 1.01).numpy()
    x = torch.randn(m, k, generator=g).numpy()
    xq, s, off, used = quantize_groups(x)
    x_n, act_n = row_norms(x, used)
    plain, screened = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
    lows, highs = (np.full((m, -(-n // COLS)), np.nan, np.float32) for _ in range(2))
    panels = vnni_panels(qw.numpy())
    int8_head_vnni(xq, s, off, panels, scale.numpy(), plain, 2)
    int8_head_vnni(xq, s, off, panels, scale.numpy(), screened, 2,
                   (err_norm[:valid], w_norm[:valid], x_n, act_n, lows, highs))
    assert np.array_equal(plain, screened)
    v = torch.from_numpy(screened[:, :valid]).double()
    e = (torch.from_numpy(x_n).double()[:, None] * torch.from_numpy(err_norm[:valid]).double()
         + torch.from_numpy(act_n).double()[:, None] * torch.from_numpy(w_norm[:valid]).double()
         + v.abs() * APPROX_OUT_REL)
    for p in range(lows.shape[1]):
        cols = slice(p * COLS, min(valid, (p + 1) * COLS))
        if cols.start >= valid:
            assert (lows[:, p] == -np.inf).all() and (highs[:, p] == -np.inf).all()
            continue
        assert np.allclose(lows[:, p], (v - e)[:, cols].amax(1).numpy(), rtol=1e-6, atol=1e-6)
        assert np.allclose(highs[:, p], (v + e)[:, cols].amax(1).numpy(), rtol=1e-6, atol=1e-6)
    best_a, best_b = np.empty(m, np.int64), np.empty(m, np.int64)
    a, b = plain.copy(), screened.copy()
    q8_0_rescore(x, used, qs, d, err_norm, w_norm, valid, a, best_a)
    q8_0_rescore_screened(x, qs, d, err_norm, w_norm, x_n, act_n, valid, b, lows, highs, COLS, best_b)
    exact = (torch.from_numpy(x).double() @ wq[:valid].double().t()).argmax(1).numpy()
    assert np.array_equal(best_a, exact) and np.array_equal(best_b, exact)
    assert np.array_equal(a, b)
