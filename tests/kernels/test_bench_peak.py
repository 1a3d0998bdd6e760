"""The arithmetic peaks (``bench_kernels peak``): each instruction runs as often as counted and does the
arithmetic its count assumes; a CPU with none of them is told so."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from edgellm.kernels.cpu import bench_peak


def test_without_avx2_or_avx512_it_says_so(monkeypatch):
    monkeypatch.setattr(bench_peak, "available", lambda: [])
    assert bench_peak.bench_peak(SimpleNamespace(threads=2)) == [
        "peak: this CPU has neither AVX2 with FMA nor AVX-512 (the peaks are measured on their instructions)"]


@pytest.mark.parametrize("kind", list(bench_peak.KINDS))
@pytest.mark.parametrize("trips", [1, 8, 1000])
def test_every_accumulator_takes_each_instruction_of_every_trip(kind, trips):
    """Operands 1 and 2 in lane 0 (a float, a bf16 pair's high half, a byte): every instruction adds 2
    to lane 0 of its accumulator, which starts at its index: they sum to 120 + 2 x 16 x 4 trips."""
    if kind not in bench_peak.available():
        pytest.skip(f"this CPU has no {kind}")
    starts, instructions = sum(range(bench_peak.ACCUMULATORS)), bench_peak.ACCUMULATORS * bench_peak.UNROLL * trips
    assert bench_peak._one(trips, kind) == starts + 2 * instructions
    # two workers, the second's operands 2 and 4: 8 a step
    assert bench_peak._every(trips, 2, kind) == 2 * starts + (2 + 8) * instructions


def test_each_available_instruction_gets_a_line_with_both_rates():
    lines = bench_peak.bench_peak(SimpleNamespace(threads=2))
    kinds = bench_peak.available()
    if not kinds:
        pytest.skip("this CPU has neither AVX2 with FMA nor AVX-512")
    assert len(lines) == len(kinds)
    for kind, line in zip(kinds, lines):
        rates = [float(v) for v in re.findall(r"([0-9.]+) G ops/s", line)]
        assert line.startswith(f"peak {kind}") and len(rates) == 2 and min(rates) > 0, line
