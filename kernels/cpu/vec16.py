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


def hreduce(builder, v, op):
    """Every lane of the 16-lane ``v`` combined by ``op`` (``builder.fadd``, a max...) in a fixed tree of
    rotations; each lane ends up holding the result."""
    for half in (8, 4, 2, 1):
        v = op(v, builder.shuffle_vector(v, v, ir.Constant(I32X16, [(i + half) % 16 for i in range(16)])))
    return v


def _like(value_type, v):
    """The constant ``v`` of an integer type or of every lane of an integer vector type."""
    return ir.Constant(value_type, [v] * value_type.count if isinstance(value_type, ir.VectorType) else v)


def widen_bf16(builder, bits):
    """The float32 (or 16 lanes of them) whose top halves are the bf16 ``bits`` (i16 or <16 x i16>): exact."""
    vector = isinstance(bits.type, ir.VectorType)
    i32, f32 = (I32X16, F32X16) if vector else (ir.IntType(32), ir.FloatType())
    return builder.bitcast(builder.shl(builder.zext(bits, i32), _like(i32, 16)), f32)


def round_bf16(builder, value):
    """``value`` (a float32 or 16 lanes of them) rounded to the nearest even bf16, as i16 bits (or
    <16 x i16>), as ``torch.Tensor.to(torch.bfloat16)`` rounds; a NaN stays a quiet NaN."""
    vector = isinstance(value.type, ir.VectorType)
    i32, i16 = (I32X16, I16X16) if vector else (ir.IntType(32), ir.IntType(16))
    bits = builder.bitcast(value, i32)
    high = builder.lshr(bits, _like(i32, 16))
    rounded = builder.lshr(builder.add(builder.add(bits, _like(i32, 0x7FFF)), builder.and_(high, _like(i32, 1))),
                           _like(i32, 16))
    nan = builder.icmp_unsigned(">", builder.and_(bits, _like(i32, 0x7FFFFFFF)), _like(i32, 0x7F800000))
    return builder.trunc(builder.select(nan, builder.or_(high, _like(i32, 0x40)), rounded), i16)


def load_f32x16(builder, ptr, bf16: bool):
    """16 float32 lanes from ``ptr`` (a ``<16 x i16>*`` of bf16 bits, widened exactly, where ``bf16``;
    else a ``<16 x float>*``)."""
    return widen_bf16(builder, builder.load(ptr, align=2)) if bf16 else builder.load(ptr, align=4)


def store_f32x16(builder, value, ptr, bf16: bool):
    """Store 16 float32 lanes to ``ptr``: as they are (``<16 x float>*``), or where ``bf16`` rounded
    (``round_bf16``) into a ``<16 x i16>*``."""
    if bf16:
        builder.store(round_bf16(builder, value), ptr, align=2)
    else:
        builder.store(value, ptr, align=4)
