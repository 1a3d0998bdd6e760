"""The AMX instruction micro-benchmark (``bench_kernels amx``) runs and reports a cost for each
instruction; skips on CPUs without AMX, where it reports only that."""
from __future__ import annotations

import re

import pytest

from edgellm.kernels.cpu import bench_amx
from edgellm.kernels.cpu.amx import request_amx


def test_without_amx_it_says_so(monkeypatch):
    monkeypatch.setattr(bench_amx, "request_amx", lambda: False)
    assert bench_amx.bench_amx() == ["amx: this CPU has no AMX-BF16"]


@pytest.mark.skipif(not request_amx(), reason="this CPU has no AMX-BF16")
def test_each_instruction_gets_a_positive_cycle_count(monkeypatch):
    monkeypatch.setattr(bench_amx, "ITERATIONS", 1000)
    lines = bench_amx.bench_amx()
    assert len(lines) == 5 and "nominal" in lines[0]
    for line in lines[1:]:
        cycles = float(re.search(r"([0-9.]+) cycles$", line).group(1))
        assert cycles > 0.1, line
