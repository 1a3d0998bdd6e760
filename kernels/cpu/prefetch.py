"""Software prefetch for Numba kernels: ``llvm.prefetch`` on an array element's address.

Paged KV blocks are scattered 4 KiB pieces, so the hardware prefetchers start cold at every block;
asking for the next block while the current one is computed hides most of that DRAM latency. A
burst of prefetches holds up the loads behind it, so compute-bound intrinsics spread theirs between
their arithmetic (``spread_prefetches``).

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


# A decode scoring intrinsic spreads its prefetches between its 16 keys: a burst of them stalls the
# loads of the dot products behind it (``spread_prefetches``). Key ``j`` asks for line ``j`` of its
# share of a later block's K rows and the same line of its V rows, then lines ``j + 16``, ``j + 32``,
# ... where the share is longer (head size 128, or few query heads a kv head).
SPREAD_STRIDE = 16
SPREAD_ROUNDS = 4  # lines a key asks for in K and in V at most; the last key takes any beyond
# They go into L2 only (``prefetcht1``): one into every level holds an L1 miss buffer until its line
# arrives, and a core has few of those, so fewer lines were in flight. 32 streams' decode attention over a cold
# bf16 cache on a Zen 4 (``bench_kernels attention``, 30 layers in turn), three rounds alternating: 401-587
# against 571-722 us a layer at 256 keys, 726-1,166 against 995-1,514 at 512.
SPREAD_LOCALITY = 2


def spread_plan(context, builder, types_, values):
    """For intrinsics' codegen: the plan ``(k_ptr, v_ptr, n, long)`` of ``spread_prefetches`` from the
    intrinsic's arguments ``kv`` (its array), ``k_byte``, ``v_byte``, ``l0``, ``l1`` (integers): the
    first line of the share ``l0:l1`` in K (at byte ``k_byte``) and in V (at ``v_byte``), the share's
    length, and whether it is longer than ``SPREAD_STRIDE``. Made once, before the keys: per line
    only a constant offset remains."""
    i8p = ir.IntType(8).as_pointer()
    base = builder.bitcast(context.make_array(types_[0])(context, builder, values[0]).data, i8p)
    k_byte, v_byte, l0, l1 = (context.cast(builder, v, t, types.int64) for v, t in zip(values[1:5], types_[1:5]))
    first = builder.mul(l0, ir.Constant(ir.IntType(64), CACHE_LINE))
    n = builder.sub(l1, l0)
    return (builder.gep(base, [builder.add(k_byte, first)]), builder.gep(base, [builder.add(v_byte, first)]), n,
            builder.icmp_signed(">", n, ir.Constant(ir.IntType(64), SPREAD_STRIDE)))


def spread_prefetches(builder, plan, key: int, keys: int) -> None:
    """For a scoring intrinsic's codegen, after key ``key`` of ``keys``: prefetch (into L2,
    ``SPREAD_LOCALITY``) lines ``key + SPREAD_STRIDE r`` (``r < SPREAD_ROUNDS``) of the plan's share,
    those below its length ``n``, in K and in V; after the last key, any lines past those rounds."""
    k_ptr, v_ptr, n, long = plan
    i64 = ir.IntType(64)

    def both(line):
        at = builder.mul(line, ir.Constant(i64, CACHE_LINE))
        emit_prefetch(builder, builder.gep(k_ptr, [at]), SPREAD_LOCALITY)
        emit_prefetch(builder, builder.gep(v_ptr, [at]), SPREAD_LOCALITY)

    assert keys == SPREAD_STRIDE
    with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, key), n), likely=True):
        both(ir.Constant(i64, key))
    with builder.if_then(long):
        for r in range(1, SPREAD_ROUNDS):
            line = ir.Constant(i64, key + SPREAD_STRIDE * r)
            with builder.if_then(builder.icmp_signed("<", line, n)):
                both(line)
        if key == keys - 1:  # lines past every key's rounds, if any
            start = ir.Constant(i64, SPREAD_STRIDE * SPREAD_ROUNDS)
            with cgutils.for_range_slice(builder, start, n, ir.Constant(i64, 1), inc=True) as (line, _):
                both(line)


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
