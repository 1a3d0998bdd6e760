"""Gated activations of the MLP, ``act(gate) * up``, on float32 or bf16 (uint16 bits) rows.

Reading the gate/up projection's bf16 output and writing bf16 for the down projection spares two
conversions per layer and the intermediate float32 tensors; the arithmetic is float32, rounded once
at the end, as converting, computing in torch and converting back would round.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgellm.kernels.cpu.bf16 import load_row, store_row
from edgellm.kernels.cpu.expf import exp_f32

FASTMATH = {"reassoc", "contract"}
# NumPy's error model: a float division by zero gives inf instead of raising, so the division by
# ``1 + e`` (never zero) needs no per-element check and vectorizes (2x faster, same bits)
ERRORS = "numpy"
PARALLEL_MIN_ROWS = 4  # below this, waking the thread pool costs more than the rows


@njit(inline="always")
def _silu_and_mul_row(x, out, wide, act):
    d = out.shape[0]
    xr = load_row(x, wide)
    for j in range(d):  # exp(-|g|) never overflows
        g = xr[j]
        e = exp_f32(max(-abs(g), np.float32(-87.0)))
        act[j] = (g if g >= 0 else g * e) / (np.float32(1.0) + e) * xr[d + j]  # silu(g) * up
    store_row(out, act)


@njit(cache=True, fastmath=FASTMATH, error_model=ERRORS)
def silu_and_mul(x: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = silu(x[r, :d]) * x[r, d:]`` for ``x [T, 2d]``, one row after another."""
    d = out.shape[1]
    wide = np.empty(2 * d, np.uint32)
    act = np.empty(d, np.float32)
    for r in range(x.shape[0]):
        _silu_and_mul_row(x[r], out[r], wide, act)


@njit(cache=True, fastmath=FASTMATH, parallel=True, error_model=ERRORS)
def silu_and_mul_parallel(x: np.ndarray, out: np.ndarray, n_threads: int) -> None:
    """``silu_and_mul`` with the rows split into ``n_threads`` ranges (each row's numbers unchanged)."""
    rows = x.shape[0]
    n = max(1, min(n_threads, rows))
    for w in prange(n):
        r0, r1 = w * rows // n, (w + 1) * rows // n
        silu_and_mul(x[r0:r1], out[r0:r1])
