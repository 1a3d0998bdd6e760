"""The AMX int8 head kernel against float64, and greedy steps through it keeping the exact argmax.

These run where the CPU has AMX-BF16; elsewhere the backend never calls the kernel, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.kernels.cpu.amx import make_config, request_amx
from edgellm.kernels.cpu.int8_amx import int8_amx_matmul
from tests.kernels.int8_head_checks import assert_greedy_head_exact, assert_matches_float64, int8_case

pytestmark = pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX-BF16")


@pytest.mark.parametrize("m", [1, 4, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (1024, 64)])
def test_matches_float64(m, n, k):
    x, qw, scale = int8_case(m, n, k)
    out = np.full((m, n), np.nan, np.float32)
    int8_amx_matmul(x.view(torch.uint16).numpy(), qw.numpy(), scale.float().numpy(), out, make_config(), 2)
    assert_matches_float64(out, x, qw, scale)


@pytest.mark.parametrize("m", [cpu_backend.AMX_HEAD_MIN_ROWS, 32, 40])
def test_greedy_steps_through_amx_keep_the_exact_argmax(m, monkeypatch):
    assert_greedy_head_exact(m, monkeypatch, "int8_amx_matmul")
