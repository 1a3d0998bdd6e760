"""``q8_0_gemv``: Q8_0 weights times int16 activation groups, the full logits of sampled steps.
Exact block sums, float64 references, any row and column count, and a row's numbers independent
of its batch. Skips on CPUs without AVX512-VNNI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.kernels.cpu.int4_gemv import quantize_groups_int16_f32
from edgellm.kernels.cpu.q8_0_gemv import q8_0_gemv, q8_0_panels, supported

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-VNNI")


def case(m: int, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x float32 [m, k], qs int8 [n, k], d float32 [n, k/32])``."""
    g = torch.Generator().manual_seed(seed * 1000 + m * 7 + n)
    qs = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    d = torch.rand(n, k // 32, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    x[:, 3] = 40.0  # an outlier coarsens its own group only
    return x.numpy(), qs.numpy(), d.numpy()


def used_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xq, xs, xq * xs)`` as the kernel takes them."""
    xq, xs, _ = quantize_groups_int16_f32(x)
    m, k = x.shape
    return xq, xs, (xq.astype(np.float64).reshape(m, -1, 32) * xs[:, :, None]).reshape(m, k)


@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("n, k", [(16, 32), (300, 576), (1000, 64), (96, 2048)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_of_the_quantized_groups(m, n, k, threads):
    x, qs, d = case(m, n, k)
    xq, xs, used = used_activations(x)
    out = np.full((m, n), np.nan, np.float32)
    q8_0_gemv(xq, xs, *q8_0_panels(qs, d), out, threads)
    w = (qs.astype(np.float64).reshape(n, -1, 32) * d[:, :, None]).reshape(n, k)
    want = used @ w.T
    # exact block sums; a float32 product and multiply-add for each of the k / 32 blocks
    bound = (k / 16 + 4) * 2.0 ** -24 * (np.abs(used) @ np.abs(w).T) + 1e-30
    assert (np.abs(out - want) <= bound).all()
    # the int16 groups sit within half a step of the activations: against the float32 activations,
    # each weight's error is at most half its group's step
    half_steps = np.repeat(0.51 * xs.astype(np.float64), 32, axis=1)
    assert (np.abs(out - x.astype(np.float64) @ w.T) <= half_steps @ np.abs(w).T + bound).all()


def test_panels_hold_pairs_of_consecutive_weights_and_their_block_scales():
    _, qs, d = case(1, 40, 64)
    qp, dt = q8_0_panels(qs, d)
    assert qp.shape == (3, 32, 16, 2) and dt.shape == (3, 2, 16)
    assert qp[2, 5, 3, 0] == qs[35, 10] and qp[2, 5, 3, 1] == qs[35, 11] and dt[2, 1, 3] == d[35, 1]
    assert (qp[2, :, 8:] == 0).all() and (dt[2, :, 8:] == 0).all()  # columns past N weigh nothing


def test_the_largest_block_sums_stay_exact():
    k = 64
    qs = np.full((32, k), 127, np.int8)
    qs[1::2] = -127
    d = np.ones((32, k // 32), np.float32)
    x = np.full((2, k), 3.0, np.float32)
    xq, xs, used = used_activations(x)
    assert np.abs(xq).max() == 32767
    out = np.empty((2, 32), np.float32)
    q8_0_gemv(xq, xs, *q8_0_panels(qs, d), out, 2)
    want = used @ (qs.astype(np.float64) * 1.0).T
    assert np.allclose(out, want, rtol=2.0 ** -20, atol=0)


def test_a_rows_numbers_do_not_depend_on_its_batch():
    x, qs, d = case(40, 500, 576, seed=4)
    xq, xs, _ = used_activations(x)
    panels = q8_0_panels(qs, d)
    crowd = np.empty((40, 500), np.float32)
    q8_0_gemv(xq, xs, *panels, crowd, 2)
    for r in (0, 7, 8, 39):
        alone = np.empty((1, 500), np.float32)
        q8_0_gemv(xq[r:r + 1], xs[r:r + 1], *panels, alone, 1)
        assert np.array_equal(alone[0], crowd[r])
