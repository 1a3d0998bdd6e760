"""Codegen helpers on 16-lane (512-bit) vectors for the kernels' intrinsics."""
from __future__ import annotations

from llvmlite import ir


def splat(builder, scalar, width: int = 16):
    """``scalar`` (any LLVM scalar value) in all ``width`` lanes."""
    v = ir.VectorType(scalar.type, width)
    one = builder.insert_element(ir.Constant(v, None), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(v, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))


def transpose16(builder, rows: list) -> list:
    """The 16 x 16 transpose of 16 vectors of 16 32-bit lanes: four rounds of two-source shuffles,
    round ``b`` swapping the elements whose row and column differ in bit ``b``."""
    mask_type = ir.VectorType(ir.IntType(32), 16)
    for b in range(4):
        d = 1 << b
        rows = [builder.shuffle_vector(rows[i], rows[i ^ d], ir.Constant(
            mask_type, [c if (c & d) == (i & d) else 16 + (c ^ d) for c in range(16)])) for i in range(16)]
    return rows


F32X16 = ir.VectorType(ir.FloatType(), 16)
I32X16 = ir.VectorType(ir.IntType(32), 16)
I16X16 = ir.VectorType(ir.IntType(16), 16)


def const16(value, vtype=F32X16):
    """``value`` in all 16 lanes of ``vtype`` (float32 by default)."""
    return ir.Constant(vtype, [value] * 16)


def load_f32x16(builder, ptr, bf16: bool):
    """16 float32 lanes from ``ptr`` (a ``<16 x i16>*`` of bf16 bits, widened exactly, where ``bf16``;
    else a ``<16 x float>*``)."""
    if not bf16:
        return builder.load(ptr, align=4)
    wide = builder.zext(builder.load(ptr, align=2), I32X16)
    return builder.bitcast(builder.shl(wide, const16(16, I32X16)), F32X16)


def store_f32x16(builder, value, ptr, bf16: bool):
    """Store 16 float32 lanes to ``ptr``: as they are (``<16 x float>*``), or where ``bf16`` rounded to
    the nearest even bf16 (a NaN stays a quiet NaN), as ``bf16.round_bits`` rounds each, into a
    ``<16 x i16>*``."""
    if not bf16:
        builder.store(value, ptr, align=4)
        return
    bits = builder.bitcast(value, I32X16)
    high = builder.lshr(bits, const16(16, I32X16))
    odd = builder.and_(high, const16(1, I32X16))
    rounded = builder.lshr(builder.add(builder.add(bits, const16(0x7FFF, I32X16)), odd), const16(16, I32X16))
    nan = builder.icmp_unsigned(">", builder.and_(bits, const16(0x7FFFFFFF, I32X16)), const16(0x7F800000, I32X16))
    out = builder.select(nan, builder.or_(high, const16(0x40, I32X16)), rounded)
    builder.store(builder.trunc(out, I16X16), ptr, align=2)
