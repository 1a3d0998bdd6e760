"""Array views without reference counting, for the hot loops of parallel kernels.

Numba counts references on every array a compiled function slices, passes on or lets go of, with an
atomic ``lock inc``/``lock dec`` on the array's memory info. Two threads working on the same arrays
(the KV cache, the block tables, the step's queries) bounce that counter's cache line between their
cores at every count: decode attention spent 60 % of a one-key step there. A view whose memory info
is null is never counted (NRT's incref and decref skip null), and neither is any view taken from it.

Only for arrays that outlive the view: a caller's arguments, or scratch that stays referenced.

Example::

    kv = unmanaged(kv)  # inside a worker: kv[0, block, head] and kv.reshape(-1) count nothing
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def unmanaged(typingctx, arr):
    """``arr`` (any array) with a null memory info and parent: the same data, shape and strides."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        view = context.make_array(sig.args[0])(context, builder, args[0])
        view.meminfo = ir.Constant(view.meminfo.type, None)
        view.parent = ir.Constant(view.parent.type, None)
        return view._getvalue()

    return arr(arr), codegen


@intrinsic
def keep_alive(typingctx, arr):
    """Nothing, but a use of ``arr``: called after the last use of its ``unmanaged`` views, it keeps
    the array referenced (and its memory allocated) until then."""
    if not isinstance(arr, types.Array):
        return None
    return types.void(arr), lambda context, builder, sig, args: context.get_dummy_value()


@intrinsic
def flat(typingctx, arr):
    """A C-contiguous array as one dimension, a view like ``arr.reshape(-1)`` without Numba's call
    into its reshape helper (~30 ns, at every decode item's ``p @ V``)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        return None
    out_ty = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        view = context.make_array(out_ty)(context, builder)
        n = ir.Constant(ir.IntType(64), 1)
        for extent in cgutils.unpack_tuple(builder, src.shape, sig.args[0].ndim):
            n = builder.mul(n, extent)
        context.populate_array(view, data=src.data, shape=cgutils.pack_array(builder, [n]),
                               strides=cgutils.pack_array(builder, [src.itemsize]), itemsize=src.itemsize,
                               meminfo=src.meminfo, parent=src.parent)
        context.nrt.incref(builder, out_ty, view._getvalue())
        return view._getvalue()

    return out_ty(arr), codegen
