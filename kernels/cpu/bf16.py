"""bfloat16 rows in Numba, which has no bf16 type: arrays hold the bits as uint16.

Widening (a 16-bit shift) is exact; narrowing rounds to nearest even, as torch's
``.to(torch.bfloat16)`` does, so a kernel that reads and writes bf16 computes the same numbers as
widening in torch, computing in float32 and converting back. The helpers take float32 rows too, so
one kernel source serves both dtypes (Numba compiles a version per dtype). An int8 cache's rows
(``kv_int8``) take the same helpers: an element widens to its code (times the row's scale, which the
kernels apply per row), and a store quantizes the row.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from edgellm.kernels.cpu.kv_int8 import quantize_row
from edgellm.kernels.cpu.vec16 import round_bf16, widen_bf16


@intrinsic
def widen_bits(typingctx, bits):
    """The float32 whose top half is the bf16 ``bits`` (uint16): exact.

    Spelled out on 32-bit lanes: Numba's own ``np.uint32(b) << 16`` is typed uint64, which
    vectorizes at a quarter of the width."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return widen_bf16(builder, args[0])

    return types.float32(bits), codegen


@intrinsic
def round_bits(typingctx, x):
    """``x`` (float32) rounded to the nearest even bf16, as uint16 bits; a NaN stays a quiet NaN."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return round_bf16(builder, args[0])

    return types.uint16(x), codegen


def as_f32(x):
    """An element as float32: itself, bf16 bits widened (exact), or an int8 code."""
    raise NotImplementedError("only callable from Numba code")


@overload(as_f32, inline="always")
def _as_f32_impl(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:
        return lambda x: widen_bits(x)
    if x == types.int8:
        return lambda x: np.float32(x)
    return None


def bf16_bits(x, scale):
    """A bf16 cache element as it is, or an int8 code times its row's ``scale`` rounded to bf16 bits."""
    raise NotImplementedError("only callable from Numba code")


@overload(bf16_bits, inline="always")
def _bf16_bits_impl(x, scale):
    if x == types.uint16:
        return lambda x, scale: x
    if x == types.int8:
        return lambda x, scale: round_bits(np.float32(x) * scale)
    return None


def from_f32(like, x):
    """A float32 ``x`` as an element of the float32 or bf16-as-uint16 array ``like``: itself, or
    rounded to bf16 bits (``round_bits``)."""
    raise NotImplementedError("only callable from Numba code")


@overload(from_f32, inline="always")
def _from_f32_impl(like, x):
    if like.dtype == types.float32:
        return lambda like, x: x
    if like.dtype == types.uint16:
        return lambda like, x: round_bits(x)
    return None


def load_row(src: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """A row as float32: ``src`` itself, or its bf16 bits widened into ``scratch`` (uint32, as long)."""
    raise NotImplementedError("only callable from Numba code")


@overload(load_row)
def _load_row_impl(src, scratch):
    if src.dtype == types.float32:
        return lambda src, scratch: src
    if src.dtype == types.uint16:
        def widen(src, scratch):
            out = scratch.view(np.float32)
            for d in range(src.shape[0]):
                out[d] = widen_bits(src[d])
            return out
        return widen
    return None


def store_row(dst: np.ndarray, src: np.ndarray) -> None:
    """Write a float32 row into a float32 or bf16-as-uint16 row, or quantize it into an int8 cache row."""
    raise NotImplementedError("only callable from Numba code")


@overload(store_row)
def _store_row_impl(dst, src):
    if dst.dtype in (types.float32, types.uint16):
        def store(dst, src):
            for d in range(src.shape[0]):
                dst[d] = from_f32(dst, src[d])
        return store
    if dst.dtype == types.int8:
        return lambda dst, src: quantize_row(dst, src)
    return None
