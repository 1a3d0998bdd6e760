"""Intel AMX tile instructions for Numba kernels, as ``llvm.x86`` intrinsics.

AMX (Sapphire Rapids and later) adds eight 1 KiB tile registers and a tile matrix multiply:
``tile_dp_bf16(c, a, b)`` does ``C[16x16 f32] += A[16x32 bf16] @ B[32x16 bf16]`` in one
instruction, with B in "VNNI" layout (row ``r`` holds the pairs ``B[2r, n], B[2r + 1, n]``).
Tile numbers are compile-time constants (0-7). A thread configures its tiles once with
``tile_config(cfg)`` (``make_config``) and releases them with ``tile_release()``; Linux grants the
tile state to a process only after ``request_amx()``.

Example::

    if request_amx():
        cfg = make_config()
        # in @njit code: tile_config(cfg); tile_zero(0); tile_load(4, a, 0, 64) ...
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.isa import has

TILE_ROWS = 16
TILE_BYTES_PER_ROW = 64

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def amx_int8_supported() -> bool:
    """Whether this CPU has AMX-INT8 (``tile_dp_bssd``, ``tile_dp_bsud``); ``request_amx`` grants the tiles."""
    return has("amx-int8")


@functools.cache
def request_amx() -> bool:
    """True when this CPU has AMX-BF16 and the kernel lets this process use the tile registers."""
    if not has("amx-tile", "amx-bf16"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def make_config(rows: int = TILE_ROWS, bytes_per_row: int = TILE_BYTES_PER_ROW) -> np.ndarray:
    """The 64-byte ``ldtilecfg`` block: palette 1, all eight tiles ``rows x bytes_per_row``."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32] = np.frombuffer(np.full(8, bytes_per_row, np.uint16).tobytes(), np.uint8)
    cfg[48:56] = rows
    return cfg


def _call(builder, name, args, arg_types):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arg_types), name)
    builder.call(fn, args)


def _tile_id(t) -> ir.Constant:
    return ir.Constant(ir.IntType(8), t.literal_value)


def element_ptr(context, builder, aryty, ary_val, index_val, index_ty, pointee=None, offset=0):
    """For intrinsics' codegen: a pointer to ``ary.flat[index + offset]`` as ``pointee*`` (default
    ``i8*``), e.g. an ``<16 x float>*`` for one vector load or store."""
    ary = context.make_array(aryty)(context, builder, ary_val)
    index = context.cast(builder, index_val, index_ty, types.intp)
    if offset:
        index = builder.add(index, ir.Constant(index.type, offset))
    return builder.bitcast(builder.gep(ary.data, [index]), ir.PointerType(pointee or ir.IntType(8)))


def emit_cases(builder, value, cases, emit):
    """For intrinsics' codegen: ``emit(c)`` for the ``c`` of ``cases`` equal to the run-time integer
    ``value`` (the last case for any other value), so one intrinsic holds a body specialized for each
    compile-time constant and callers pass a plain integer; a constant ``value`` folds to one body."""
    done = builder.append_basic_block("cases.done")
    blocks = [builder.append_basic_block(f"cases.{c}") for c in cases]
    switch = builder.switch(value, blocks[-1])
    for c, block in zip(cases, blocks):
        switch.add_case(ir.Constant(value.type, c), block)
        builder.position_at_end(block)
        emit(c)
        builder.branch(done)
    builder.position_at_end(done)


def _is_tile(t) -> bool:
    return isinstance(t, types.IntegerLiteral) and 0 <= t.literal_value < 8


@intrinsic(prefer_literal=True)
def tile_config(typingctx, cfg):
    """``ldtilecfg``: load this thread's tile shapes from a 64-byte uint8 array."""
    if not (isinstance(cfg, types.Array) and cfg.dtype == types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], context.get_constant(types.intp, 0), types.intp)
        _call(builder, "llvm.x86.ldtilecfg", [ptr], [ptr.type])
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic(prefer_literal=True)
def tile_release(typingctx):
    """``tilerelease``: give the tile state back (the thread's next ``tile_config`` starts afresh)."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic(prefer_literal=True)
def tile_zero(typingctx, t):
    """``tilezero t``."""
    if not _is_tile(t):
        return None

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilezero", [_tile_id(sig.args[0])], [ir.IntType(8)])
        return context.get_dummy_value()

    return types.void(t), codegen


@njit(inline="always")
def zero_accumulators(two):
    """Zero C tiles 0 and 1, and 2 and 3 where ``two``: the sums of one or two 16-row blocks by two
    16-column tiles, as the matmuls on tiles keep them."""
    tile_zero(0)
    tile_zero(1)
    if two:
        tile_zero(2)
        tile_zero(3)


def _load_store(name):
    def typer(typingctx, t, arr, index, stride):
        if not (_is_tile(t) and isinstance(arr, types.Array) and arr.layout == "C"
                and isinstance(index, types.Integer) and isinstance(stride, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = element_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2])
            stride_val = context.cast(builder, args[3], sig.args[3], types.int64)
            _call(builder, name, [_tile_id(sig.args[0]), ptr, stride_val],
                  [ir.IntType(8), ptr.type, ir.IntType(64)])
            return context.get_dummy_value()

        return types.void(t, arr, index, stride), codegen
    return typer


tile_load = intrinsic(prefer_literal=True)(_load_store("llvm.x86.tileloadd64"))
tile_load.__doc__ = "``tileloadd t, [arr.flat[index]], stride``: 16 rows, ``stride`` bytes apart."
tile_store = intrinsic(prefer_literal=True)(_load_store("llvm.x86.tilestored64"))
tile_store.__doc__ = "``tilestored [arr.flat[index]], stride, t``."


def _tile_dp(name):
    def typer(typingctx, c, a, b):
        if not (_is_tile(c) and _is_tile(a) and _is_tile(b)):
            return None

        def codegen(context, builder, sig, args):
            _call(builder, name, [_tile_id(s) for s in sig.args], [ir.IntType(8)] * 3)
            return context.get_dummy_value()

        return types.void(c, a, b), codegen
    return typer


tile_dp_bf16 = intrinsic(prefer_literal=True)(_tile_dp("llvm.x86.tdpbf16ps"))
tile_dp_bf16.__doc__ = "``tdpbf16ps c, a, b``: ``C += A @ B`` (bf16 pairs, float32 accumulation)."
tile_dp_bssd = intrinsic(prefer_literal=True)(_tile_dp("llvm.x86.tdpbssd"))
tile_dp_bssd.__doc__ = ("``tdpbssd c, a, b`` (AMX-INT8): ``C += A @ B``, signed bytes by signed bytes in groups of "
                        "four (B's row ``r`` holds rows ``4r..4r+3``), int32 sums.")
tile_dp_bsud = intrinsic(prefer_literal=True)(_tile_dp("llvm.x86.tdpbsud"))
tile_dp_bsud.__doc__ = "``tdpbsud c, a, b`` (AMX-INT8): as ``tile_dp_bssd`` with B's bytes unsigned."


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` element type, which llvmlite's IR builder does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def cvt_ne2ps2bf16(builder):
    """For intrinsics' codegen: ``<32 x bfloat> vcvtne2ps2bf16(<16 x float> hi, <16 x float> lo)``
    (AVX512-BF16), ``lo`` in lanes 0-15; rounds to nearest even, NaN stays NaN."""
    v16 = ir.VectorType(ir.FloatType(), 16)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VectorType(_BFloat(), 32), [v16, v16]),
                                          "llvm.x86.avx512bf16.cvtne2ps2bf16.512")
