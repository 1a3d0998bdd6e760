"""What AMX tile instructions cost on this CPU, back to back, data in L1 (a micro-benchmark, not a test).

``python -m edgellm.kernels.cpu.bench_kernels amx``. Cycles are at the nominal clock read from
``/proc/cpuinfo`` (the first core's "cpu MHz"), so they are comparable between runs on one machine,
not exact. A tile load that costs several tile products bounds every kernel loading a tile per product
or more (BENCHMARKS.md, round 35).
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit

from edgellm.kernels.cpu.amx import (
    make_config,
    request_amx,
    tile_config,
    tile_dp_bf16,
    tile_load,
    tile_release,
    tile_store,
    tile_zero,
)

ITERATIONS = 100_000


@njit(cache=True, inline="always")
def _setup(cfg, b):
    """Tiles 4-7 loaded, accumulators 0-3 zeroed."""
    tile_config(cfg)
    tile_load(4, b, 0, 64)
    tile_load(5, b, 256, 64)
    tile_load(6, b, 512, 64)
    tile_load(7, b, 768, 64)
    tile_zero(0)
    tile_zero(1)
    tile_zero(2)
    tile_zero(3)


@njit(cache=True)
def _products(cfg, b, n):
    """Four independent ``tdpbf16ps`` an iteration on tiles loaded once."""
    _setup(cfg, b)
    for _ in range(n):
        tile_dp_bf16(0, 4, 6)
        tile_dp_bf16(1, 4, 7)
        tile_dp_bf16(2, 5, 6)
        tile_dp_bf16(3, 5, 7)
    tile_release()


@njit(cache=True)
def _loads(cfg, b, n):
    """Eight ``tileloadd`` an iteration, each into its own tile."""
    tile_config(cfg)
    for _ in range(n):
        tile_load(0, b, 0, 64)
        tile_load(1, b, 256, 64)
        tile_load(2, b, 512, 64)
        tile_load(3, b, 768, 64)
        tile_load(4, b, 1024, 64)
        tile_load(5, b, 1280, 64)
        tile_load(6, b, 1536, 64)
        tile_load(7, b, 1792, 64)
    tile_release()


@njit(cache=True)
def _stores(cfg, b, n):
    """Four ``tilestored`` an iteration."""
    tile_config(cfg)
    tile_zero(0)
    for _ in range(n):
        tile_store(0, b, 0, 64)
        tile_store(0, b, 256, 64)
        tile_store(0, b, 512, 64)
        tile_store(0, b, 768, 64)
    tile_release()


@njit(cache=True)
def _load_then_products(cfg, b, n):
    """One ``tileloadd`` and three products that read it, an iteration."""
    _setup(cfg, b)
    for _ in range(n):
        tile_load(4, b, 768, 64)
        tile_dp_bf16(0, 4, 5)
        tile_dp_bf16(1, 4, 6)
        tile_dp_bf16(2, 4, 7)
    tile_release()


def nominal_hz() -> float:
    """The first core's "cpu MHz" from ``/proc/cpuinfo``, in Hz (2.5 GHz where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return 2.5e9


def bench_amx(backend=None) -> list[str]:
    """Cycles per instruction (or per load-and-three-products group) of the tile instructions."""
    if not request_amx():
        return ["amx: this CPU has no AMX-BF16"]
    cfg = make_config()
    b = np.full(16 * 16 * 8, 0x3F803F80, np.uint32)  # eight 1 KiB tiles of bf16 ones
    hz = nominal_hz()
    lines = [f"amx: cycles at the nominal {hz / 1e9:.2f} GHz, {ITERATIONS} iterations, best of 3"]
    for name, fn, per_iteration in (("tdpbf16ps, four accumulators", _products, 4),
                                    ("tileloadd, eight tiles in turn", _loads, 8),
                                    ("tilestored", _stores, 4),
                                    ("tileloadd + three tdpbf16ps reading it", _load_then_products, 1)):
        fn(cfg, b, 10)  # compile
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn(cfg, b, ITERATIONS)
            best = min(best, time.perf_counter() - t0)
        lines.append(f"amx: {name:40s} {best / (ITERATIONS * per_iteration) * hz:6.1f} cycles")
    return lines
