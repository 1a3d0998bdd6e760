"""The AMX int8 head kernels against float64 and ``int8_gemv``, and greedy steps through them keeping
the exact argmax.

These run where the CPU has AMX (AMX-INT8 for ``int8_head_amx``); elsewhere the backend never calls
the kernels, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.kernels.cpu.amx import amx_int8_supported, make_config, request_amx
from edgellm.kernels.cpu.int8_amx import int8_amx_matmul
from edgellm.kernels.cpu.int8_gemv import int8_gemv, quantize_rows_int16, xq_limit
from edgellm.kernels.cpu.int8_head_amx import STREAM_MIN_BYTES, int8_head_amx, screen_arrays
from edgellm.kernels.cpu.q8_0 import APPROX_OUT_REL
from tests.kernels.int8_head_checks import assert_greedy_head_exact, assert_matches_float64, int8_case

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX-BF16")


@pytest.mark.parametrize("m", [1, 4, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (1024, 64)])
def test_matches_float64(m, n, k):
    x, qw, scale = int8_case(m, n, k)
    out = np.full((m, n), np.nan, np.float32)
    int8_amx_matmul(x.view(torch.uint16).numpy(), qw.numpy(), scale.float().numpy(), out, make_config(), 2)
    assert_matches_float64(out, x, qw, scale)


def test_greedy_steps_through_amx_keep_the_exact_argmax(monkeypatch):
    monkeypatch.setattr(cpu_backend, "amx_int8_supported", lambda: False)  # CPUs with AMX-BF16 alone
    for m in (cpu_backend.AMX_HEAD_MIN_ROWS, 32, 40):
        assert_greedy_head_exact(m, monkeypatch, "int8_amx_matmul")


int8_tiles = pytest.mark.skipif(not amx_int8_supported(), reason="this CPU has no AMX-INT8")


@int8_tiles
@pytest.mark.parametrize("m", [1, 4, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(16, 64), (96, 576), (1024, 128), (2048, 2048)])
def test_int16_activations_on_int8_tiles_give_int8_gemvs_numbers(m, n, k):
    x, qw, scale = int8_case(m, n, k)
    xq, s = quantize_rows_int16(x.float().numpy() * 50, xq_limit(k))  # |xq| up to the limit
    want = np.empty((m, n), np.float32)
    int8_gemv(xq, s, qw.numpy(), scale.float().numpy(), want, 2)
    for threads in (1, 2, 3):
        out = np.full((m, n), np.nan, np.float32)
        int8_head_amx(xq, s, qw.numpy(), scale.float().numpy(), out, make_config(), threads, _screen(m, n, n))
        assert np.array_equal(out, want)


def _screen(m: int, n: int, valid: int) -> tuple:
    """``screen_arrays`` with random norms (the bounds' inputs), seeded by the shape."""
    rng = np.random.default_rng(m * 31 + n)
    err_norm, w_norm = (rng.random(n, dtype=np.float32) for _ in range(2))
    x_n, act_n = (rng.random(m, dtype=np.float32) * 10 for _ in range(2))
    return screen_arrays(m, n, valid, err_norm, w_norm, x_n, act_n)


@int8_tiles
@pytest.mark.parametrize("m, n, valid", [(1, 64, 64), (17, 96, 90), (32, 1024, 1000), (40, 2048, 1)])
def test_int8_tiles_bound_each_16_columns_as_they_store_them(m, n, valid):
    """``lows[t, r]`` and ``highs[t, r]``: the largest ``v - e`` and ``v + e`` over row ``r``'s columns
    ``16 t .. 16 t + 15`` below ``valid``, ``e = x_n err_norm + act_n w_norm + |v| 2^-7`` in float32 as
    written (no fused multiply-adds), -inf for chunks past ``valid``."""
    k = 128
    x, qw, scale = int8_case(m, n, k)
    xq, s = quantize_rows_int16(x.float().numpy() * 50, xq_limit(k))
    out = np.empty((m, n), np.float32)
    screen = _screen(m, n, valid)
    int8_head_amx(xq, s, qw.numpy(), scale.float().numpy(), out, make_config(), 2, screen)
    _, err_norm, w_norm, x_n, act_n, lows, highs = screen
    e = (x_n[:m, None] * err_norm[None, :] + act_n[:m, None] * w_norm[None, :]) + np.abs(out) * np.float32(
        APPROX_OUT_REL)
    inside = np.arange(n)[None, :] < valid
    want_lo = np.where(inside, out - e, -np.inf).reshape(m, n // 16, 16).max(-1)
    want_hi = np.where(inside, out + e, -np.inf).reshape(m, n // 16, 16).max(-1)
    assert np.array_equal(lows.T[:m], want_lo)
    assert np.array_equal(highs.T[:m], want_hi)


@int8_tiles
@pytest.mark.parametrize("offset", [0, 1])  # on cache lines (streaming stores) or 4 bytes past them
def test_int8_tiles_stream_big_outputs(offset):
    """Outputs of ``STREAM_MIN_BYTES`` and more go past the caches where they start on a cache line:
    the same numbers either way."""
    m, n, k = 33, 16384, 64
    assert m * n * 4 >= STREAM_MIN_BYTES
    x, qw, scale = int8_case(m, n, k)
    xq, s = quantize_rows_int16(x.float().numpy(), xq_limit(k))
    want = np.empty((m, n), np.float32)
    int8_gemv(xq, s, qw.numpy(), scale.float().numpy(), want, 2)
    buf = np.full(m * n + 32, np.nan, np.float32)
    start = (-buf.ctypes.data % 64) // 4 + offset
    out = buf[start:start + m * n].reshape(m, n)
    assert (out.ctypes.data % 64 == 0) == (offset == 0)
    int8_head_amx(xq, s, qw.numpy(), scale.float().numpy(), out, make_config(), 2, _screen(m, n, n))
    assert np.array_equal(out, want)


@int8_tiles
@pytest.mark.parametrize("m", [cpu_backend.AMX_HEAD_MIN_ROWS, 32, 40])
def test_greedy_steps_through_int8_tiles_keep_the_exact_argmax(m, monkeypatch):
    assert_greedy_head_exact(m, monkeypatch, "int8_head_amx")
