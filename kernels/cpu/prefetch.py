"""Software prefetch for Numba kernels: ``llvm.prefetch`` on an array element's address.

Paged KV blocks are scattered 4 KiB pieces, so the hardware prefetchers start cold at every block;
asking for the next block while the current one is computed hides most of that DRAM latency.

Example::

    prefetch_rows(kv[0, next_block, head])  # every cache line of a [block_size, D] block
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

CACHE_LINE = 64


def _prefetch_intrinsic(locality: int, doc: str):
    def impl(typingctx, arr, idx):
        if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(idx, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            index = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False)
            ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())  # one declaration for every dtype
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0")
            # read (0), the locality, data cache (1)
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(arr, idx), codegen

    impl.__doc__ = doc
    return intrinsic(impl)


prefetch = _prefetch_intrinsic(3, """Hint the CPU to load ``arr.flat[idx]``'s cache line into all cache levels (no
    fault, no effect on results).""")
prefetch_l2 = _prefetch_intrinsic(2, """``prefetch`` into the outer levels only (L2 and beyond): for data wanted a
    while later, which would only crowd L1 now.""")


@njit(inline="always")
def _prefetch_block(block: np.ndarray, outer_only: bool) -> None:
    flat = block.reshape(-1)
    step = CACHE_LINE // flat.itemsize
    for i in range(0, flat.shape[0], step):
        if outer_only:  # a constant once inlined: the branch folds away
            prefetch_l2(flat, i)
        else:
            prefetch(flat, i)


@njit(inline="always")
def prefetch_rows(block: np.ndarray) -> None:
    """Prefetch every cache line of a C-contiguous 2-D block."""
    _prefetch_block(block, False)


@njit(inline="always")
def prefetch_rows_l2(block: np.ndarray) -> None:
    """``prefetch_rows`` into L2 (``prefetch_l2``)."""
    _prefetch_block(block, True)
