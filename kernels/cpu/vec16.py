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
