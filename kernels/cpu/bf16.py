"""bfloat16 rows in Numba, which has no bf16 type: arrays hold the bits as uint16.

Widening (a 16-bit shift) is exact; narrowing rounds to nearest even, as torch's
``.to(torch.bfloat16)`` does, so a kernel that reads and writes bf16 computes the same numbers as
widening in torch, computing in float32 and converting back. The helpers take float32 rows too, so
one kernel source serves both dtypes (Numba compiles a version per dtype).
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload


def load_row(src: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """A row as float32: ``src`` itself, or its bf16 bits widened into ``scratch`` (uint32, as long)."""
    raise NotImplementedError("only callable from Numba code")


@overload(load_row)
def _load_row_impl(src, scratch):
    if src.dtype == types.float32:
        return lambda src, scratch: src
    if src.dtype == types.uint16:
        def widen(src, scratch):
            for d in range(src.shape[0]):
                scratch[d] = np.uint32(src[d]) << np.uint32(16)
            return scratch.view(np.float32)
        return widen
    return None


def store_row(dst: np.ndarray, src: np.ndarray) -> None:
    """Write a float32 row into a float32 or bf16-as-uint16 row."""
    raise NotImplementedError("only callable from Numba code")


@overload(store_row)
def _store_row_impl(dst, src):
    if dst.dtype == types.float32:
        def copy(dst, src):
            for d in range(src.shape[0]):
                dst[d] = src[d]
        return copy
    if dst.dtype == types.uint16:
        def round_to_bf16(dst, src):
            bits = src.view(np.uint32)
            for d in range(src.shape[0]):
                b = bits[d]
                if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays a quiet NaN
                    dst[d] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
                else:  # round to nearest even
                    r = np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
                    dst[d] = np.uint16((b + r) >> np.uint32(16))
        return round_to_bf16
    return None
