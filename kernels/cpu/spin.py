"""Phases of work shared by threads that stay inside one parallel region, for Numba kernels.

A Numba ``prange`` loop is one parallel region: entering and leaving it costs 1-2 us, and a decode
step of 30 layers entered eight a layer. Workers that stay in one region instead step through the
same phases, each phase split into parts; a worker takes its own part first, then any part no one
has started, and waits (spinning) until every part of the phase is done before it starts the next
one: ~30 ns on two cores. A wait past ~25 us yields the core at each check, so that a worker waited
on that shares its core with other threads gets to run.

No worker ever waits on a part that no running worker has taken: a worker that finds every part of
a phase taken waits only on workers that are running them. So the phases finish even where the
threading layer runs the workers one after the other (one thread, or more workers than threads).

``sync`` is an int64 array of ``phases * SYNC_STRIDE`` zeros, one per region: phase ``k`` keeps a
flag per part and the count of done parts in ``sync[k * SYNC_STRIDE:]``, on its own cache line.

Example::

    sync = np.zeros(n_phases * SYNC_STRIDE, np.int64)
    for w in prange(n_workers):
        for k in range(n_phases):
            p = take(sync, k, w, n_workers)
            while p >= 0:
                work(k, p)
                p = done_and_take(sync, k, w, n_workers)
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

SYNC_STRIDE = 8  # int64s a phase: one cache line
MAX_PARTS = SYNC_STRIDE - 1  # the last one counts done parts
# ``pause``s (~23 ns each on Zen 5) a waiting worker spins before it yields its core at every check:
# where the machine runs more threads than cores, the worker waited on may need that core
SPINS_BEFORE_YIELD = 1 << 10


def _slot(context, builder, sig, args):
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    index = context.cast(builder, args[1], sig.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [index], wraparound=False)


def _int64_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1


@intrinsic
def fetch_add(typingctx, arr, index, value):
    """``arr[index] += value`` as one atomic (sequentially consistent) step; returns the old value."""
    if not (_int64_array(arr) and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        add = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), add, "seq_cst")

    return types.int64(arr, index, value), codegen


@intrinsic
def load_acquire(typingctx, arr, index):
    """``arr[index]``, read as an atomic load with acquire order: the writes made before another
    thread's ``fetch_add`` that this load sees are visible after it."""
    if not (_int64_array(arr) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "acquire", 8)

    return types.int64(arr, index), codegen


@intrinsic
def cpu_pause(typingctx):
    """The spin-wait hint (x86 ``pause``): a waiting core yields its pipeline to the other thread."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """The C library's ``sched_yield``: the core goes to another runnable thread, if any."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(inline="always")
def take(sync, phase, worker, parts):
    """A part of ``phase`` (of ``parts``) that no one has started, now ``worker``'s: its own
    (``worker % parts``) first, then the next ones round. -1 when every part is taken; then it waits
    until every part is done, so the phase's results are there to read."""
    base = phase * SYNC_STRIDE
    for i in range(parts):
        p = (worker + i) % parts
        if load_acquire(sync, base + p) == 0 and fetch_add(sync, base + p, 1) == 0:
            return p
    spins = 0
    while load_acquire(sync, base + MAX_PARTS) < parts:
        if spins < SPINS_BEFORE_YIELD:
            cpu_pause()
            spins += 1
        else:
            sched_yield()
    return -1


@njit(inline="always")
def done_and_take(sync, phase, worker, parts):
    """Count a part of ``phase`` done (its writes published), then ``take`` the next one."""
    fetch_add(sync, phase * SYNC_STRIDE + MAX_PARTS, 1)
    return take(sync, phase, worker, parts)
