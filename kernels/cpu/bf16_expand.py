"""Expand packed weights to bfloat16 for the AMX/AVX-512-BF16 GEMMs of batched steps.

A step with many rows (a prefill chunk, a large decode batch) is cheapest as one oneDNN bf16 GEMM:
ATen's int4 kernel costs a roughly fixed time per row, while the GEMM (AMX or AVX512-BF16) barely
grows with the row count. The dense bf16 weight is not kept (weights stay packed in memory): it is
expanded each step into a scratch buffer shared by all weights of one shape. Expansion plus GEMM
beats the int4 kernel past about 32 rows in a real step (7x at 512 rows). bfloat16 values are handled
as their uint16 bits (Numba has no bf16 type) and rounded to nearest even from float32.

Example::

    out = np.empty((k, n), np.uint16)                       # W^T as bf16 bits
    int4pack_to_bf16_t(packed, scale_zeros_bits, 32, out)  # packed: ATen's CPU int4pack layout
    y = torch.mm(x_bf16, torch.from_numpy(out).view(torch.bfloat16))
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr
from edgellm.kernels.cpu.paged_attention import FASTMATH

BLOCK_N = 64  # rows per ATen int4pack block


@intrinsic
def _expand_row(typingctx, packed, src, sz, out, dst):
    """``out.flat[dst + j] = bf16(q_j * sz[j] + sz[64 + j])`` for ``j < 64``, ``q_j`` the low nibbles
    (``j < 32``) then the high ones of the 32 bytes at ``packed.flat[src]``, in 16-lane vectors: a
    fused multiply-add, then round to nearest even in integer lanes (weights are finite, so no NaN
    case; a select for it made the old scalar loop 1.2-1.4x slower). The same bits as that loop, which
    went through a float32 row buffer and took 1.3-1.5x as long; any vector width."""
    if not (all(isinstance(a, types.Array) and a.layout == "C" for a in (packed, sz, out))
            and packed.dtype == types.uint8 and sz.dtype == types.float32 and out.dtype == types.uint16):
        return None

    def codegen(context, builder, sig, args):
        t_p, t_src, t_sz, t_out, t_dst = sig.args
        a_p, a_src, a_sz, a_out, a_dst = args
        i32, f32 = ir.IntType(32), ir.FloatType()
        v16 = lambda t: ir.VectorType(t, 16)  # noqa: E731
        splat = lambda v: ir.Constant(v16(i32), [v] * 16)  # noqa: E731
        halves = [builder.zext(builder.load(element_ptr(context, builder, t_p, a_p, a_src, t_src, v16(ir.IntType(8)),
                                                        16 * h), align=1), v16(i32)) for h in range(2)]
        for piece in range(4):  # columns 16 piece: low nibbles of bytes 0-15, 16-31, then the high ones
            wide = halves[piece % 2]
            q = builder.and_(wide, splat(15)) if piece < 2 else builder.lshr(wide, splat(4))
            s = builder.load(element_ptr(context, builder, t_sz, a_sz, ir.Constant(ir.IntType(64), 16 * piece),
                                         types.int64, v16(f32)), align=4)
            z = builder.load(element_ptr(context, builder, t_sz, a_sz, ir.Constant(ir.IntType(64), 64 + 16 * piece),
                                         types.int64, v16(f32)), align=4)
            w = builder.fadd(builder.fmul(builder.uitofp(q, v16(f32)), s, flags=("contract",)), z, flags=("contract",))
            bits = builder.bitcast(w, v16(i32))
            odd = builder.and_(builder.lshr(bits, splat(16)), splat(1))
            rounded = builder.lshr(builder.add(builder.add(bits, splat(0x7FFF)), odd), splat(16))
            builder.store(builder.trunc(rounded, v16(ir.IntType(16))),
                          element_ptr(context, builder, t_out, a_out, a_dst, t_dst, v16(ir.IntType(16)), 16 * piece),
                          align=2)
        return context.get_dummy_value()

    return types.void(packed, src, sz, out, dst), codegen


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def int4pack_to_bf16_t(packed: np.ndarray, scale_zeros: np.ndarray, group: int, out_t: np.ndarray,
                       chunks: int) -> None:
    """``out_t[k, n] = bf16((q[n, k] - 8) * scale + zero)``.

    ``packed`` uint8 [N/64, K, 32] (row ``j`` in the low nibble, row ``j + 32`` in the high one);
    ``scale_zeros`` uint16 [K/group, N, 2], the bf16 bits of (scale, zero); ``out_t`` uint16 [K, N].
    Work is dealt out as (64-row block, group) tiles in a few contiguous chunks per thread, so even a
    192-row weight keeps both threads busy and each chunk allocates its buffers once.
    """
    nblocks, k_dim, _ = packed.shape
    n = out_t.shape[1]
    ngroups = k_dim // group
    tiles = nblocks * ngroups
    chunks = max(1, min(tiles, chunks))
    flat, out_flat = packed.reshape(-1), out_t.reshape(-1)
    for c in numba.prange(chunks):
        sz_bits = np.empty(2 * BLOCK_N, np.uint32)
        sz = sz_bits.view(np.float32)  # [0, 64): scale; [64, 128): zero - 8 * scale
        for tile in range(c * tiles // chunks, (c + 1) * tiles // chunks):
            nb = tile // ngroups
            g = tile - nb * ngroups
            row0 = nb * BLOCK_N
            for j in range(BLOCK_N):
                sz_bits[j] = np.uint32(scale_zeros[g, row0 + j, 0]) << np.uint32(16)
                sz_bits[BLOCK_N + j] = np.uint32(scale_zeros[g, row0 + j, 1]) << np.uint32(16)
            for j in range(BLOCK_N):
                sz[BLOCK_N + j] -= np.float32(8.0) * sz[j]
            for kk in range(g * group, g * group + group):
                _expand_row(flat, (nb * k_dim + kk) * 32, sz, out_flat, kk * n + row0)
