"""int8 K/V cache rows in Numba: ``D`` signed bytes, then the row's float32 scale in 4 more bytes.

A cache of ``kv_cache_dtype="int8"`` is an int8 array ``[2, blocks, Hkv, block_size, D + 4]``: each
(token, kv head) row of K or V holds ``round(x / s)`` in ``[-127, 127]`` with ``s = max|x| / 127``
(per row, like llama.cpp's ``q8_0`` with one block per head), so ``x ~ s * q`` to within ``s / 2``.
Keeping the scale inside the row keeps the cache one tensor per layer (block copies, prefix reuse
and memory accounting treat it like any other) and puts it in the cache line its row already uses.
Rows are 68 bytes for ``D = 64``: ~0.53x the bytes of bf16, and attention's reads halve with them.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from edgellm.kernels.cpu.amx import element_ptr

SCALE_BYTES = 4
QMAX = 127


@intrinsic
def row_scale(typingctx, row, at):
    """The float32 stored at byte ``at`` of the int8 array ``row`` (any alignment)."""
    if not (isinstance(row, types.Array) and row.dtype == types.int8 and isinstance(at, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], ir.FloatType())
        return builder.load(ptr, align=1)

    return types.float32(row, at), codegen


@intrinsic
def set_row_scale(typingctx, row, at, value):
    """Store the float32 ``value`` at byte ``at`` of the int8 array ``row``."""
    if not (isinstance(row, types.Array) and row.dtype == types.int8 and isinstance(at, types.Integer)
            and value == types.float32):
        return None

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], ir.FloatType())
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()

    return types.void(row, at, value), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bits are ``bits`` (uint32)."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, inline="always")
def quantize_row(dst, src):
    """``src`` (float32, ``D``, contiguous) into the cache row ``dst`` (int8, ``D + 4``): codes, then the
    scale. Rounds half to even, as ``torch.round`` does; an all-zero row gets scale 0. The max of
    ``|x|`` is taken on the bits (sign cleared, the same order for non-negative floats): an integer
    max reduction vectorizes, a float one does not (quantizing a prompt's rows took 3x bf16's stores)."""
    dim = src.shape[0]
    bits = src.view(np.uint32)
    top = np.uint32(0)
    for d in range(dim):
        top = max(top, bits[d] & np.uint32(0x7FFFFFFF))
    amax = _f32_from_bits(np.uint32(top))
    s = amax / np.float32(QMAX)
    inv = np.float32(QMAX) / amax if amax > 0 else np.float32(0.0)
    for d in range(dim):
        dst[d] = np.int8(min(max(np.rint(src[d] * inv), np.float32(-QMAX)), np.float32(QMAX)))
    set_row_scale(dst, dim, s)


@njit(cache=True, inline="always")
def dequantize_block(src, out):
    """``out[j, d] = src[j, d] * scale_j`` for a ``[block_size, D + 4]`` block of an int8 cache."""
    dim = out.shape[1]
    for j in range(out.shape[0]):
        s = row_scale(src[j], dim)
        for d in range(dim):
            out[j, d] = np.float32(src[j, d]) * s


def scale_of(rows, j, dim):
    """Row ``j``'s scale in an int8 cache block ``rows [n, dim + 4]``; 1 for float32 and bf16 blocks,
    whose elements are their values (the product folds away)."""
    raise NotImplementedError("only callable from Numba code")


@overload(scale_of, inline="always")
def _scale_of_impl(rows, j, dim):
    if rows.dtype == types.int8:
        return lambda rows, j, dim: row_scale(rows[j], dim)
    return lambda rows, j, dim: np.float32(1.0)
