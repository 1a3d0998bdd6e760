"""Software prefetch for Numba kernels: ``llvm.prefetch`` on an array element's address.

Paged KV blocks are scattered 4 KiB pieces, so the hardware prefetchers start cold at every block;
asking for the next block while the current one is computed hides most of that DRAM latency.

Example::

    prefetch_rows(kv[0, next_block, head])  # every cache line of a [block_size, D] block
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

CACHE_LINE = 64


def emit_prefetch(builder, ptr, locality: int) -> None:
    """For intrinsics' codegen: ``llvm.prefetch`` (read, data cache) of ``ptr``'s cache line at
    ``locality`` (3: every level, 2: L2 and beyond)."""
    ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())  # one declaration for every pointee
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0")
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


def _prefetch_intrinsic(locality: int, doc: str):
    def impl(typingctx, arr, idx):
        if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(idx, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            index = context.cast(builder, args[1], sig.args[1], types.intp)
            emit_prefetch(builder, cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False),
                          locality)
            return context.get_dummy_value()

        return types.void(arr, idx), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


def _prefetch_all_intrinsic(locality: int, doc: str):
    def impl(typingctx, arr):
        if not isinstance(arr, types.Array) or arr.layout != "C":
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            data = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
            nbytes = builder.mul(ary.nitems, ary.itemsize)
            step = ir.Constant(nbytes.type, CACHE_LINE)
            lines = builder.udiv(builder.add(nbytes, ir.Constant(nbytes.type, CACHE_LINE - 1)), step)
            with cgutils.for_range(builder, lines) as loop:
                emit_prefetch(builder, builder.gep(data, [builder.mul(loop.index, step)]), locality)
            return context.get_dummy_value()

        return types.void(arr), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


prefetch = _prefetch_intrinsic(3, """Hint the CPU to load ``arr.flat[idx]``'s cache line into all cache levels (no
    fault, no effect on results).""")
prefetch_l2 = _prefetch_intrinsic(2, """``prefetch`` into the outer levels only (L2 and beyond): for data wanted a
    while later, which would only crowd L1 now.""")
prefetch_rows = _prefetch_all_intrinsic(3, """Prefetch every cache line of a C-contiguous block (no reshape: Numba's
    costs ~35 ns a call).""")
prefetch_rows_l2 = _prefetch_all_intrinsic(2, """``prefetch_rows`` into L2 (``prefetch_l2``).""")
