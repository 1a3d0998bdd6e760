"""Decode attention's q.k scores on AVX512-VNNI (``vpdpwssd``) for an int8 KV cache (``kv_int8``), on
CPUs without AMX (AMD Zen 4 and 5, Intel Ice Lake and later), head size 64 or 128, blocks of 16n keys.

A key's row is 64 int8 codes and its float32 scale: 68 bytes against bf16's 128. q keeps 16 bits:
each query head's row (times the softmax scale) becomes ``s_q * xq`` with ``xq`` int16 in
``[-32767, 32767]``. A key's codes widen to int16 as they load (``vpmovsxbw``) and meet ``xq`` in
two ``vpdpwssd`` (exact int32 sums, pairs of dims a lane); 16 keys' vectors fold into one vector of
16 sums (``key_fold``), and ``score = sum * s_q * s_k``. That differs from the float32 dot product
of q with the dequantized keys by less than ``|k|_1 * s_k * s_q / 2``, as the AMX-INT8 kernel's does.
The softmax and ``p @ V`` (``decode_pv``, V's scale folded into p) are the other kernels'.

``attention_dpbf16`` runs the items and calls these for an int8 cache (``prepare_q_i8``, ``run_keys_i8``,
``run_scores_i8``): its decodes take this scoring in place of ``vdpbf16ps``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr
from edgellm.kernels.cpu.int8_gemv import supported as vnni_supported
from edgellm.kernels.cpu.key_fold import KEYS, emit_folded_scores
from edgellm.kernels.cpu.kv_int8 import SCALE_BYTES, row_scale
from edgellm.kernels.cpu.paged_attention import FASTMATH

HEAD_DIMS = (64, 128)
MAX_GROUP = 16
Q_MAX = 32767.0  # q's int16 codes; 128 dims x 32767 x 127 stays far inside int32


def supports(kv: np.ndarray, group: int) -> bool:
    """Whether this CPU and an int8 cache ``kv [2, blocks, Hkv, block_size, D + 4]`` with a GQA group
    size take this scoring."""
    return (kv.dtype == np.int8 and kv.shape[4] - SCALE_BYTES in HEAD_DIMS and kv.shape[3] % KEYS == 0
            and 1 <= group <= MAX_GROUP and vnni_supported())


@intrinsic(prefer_literal=True)
def _key_scores_i8(typingctx, kv, k0, xq, q0, halves, k_scales, s_q, out, o0):
    """``out[o0 + j] = (sum_d kv[k0 + j (D + 4) + d] * xq[q0 + d]) * k_scales[j] * s_q`` for the 16 keys
    ``j`` of a block's run whose first row starts at byte ``k0`` of the flat int8 cache, ``D`` = 32
    ``halves`` (a compile-time constant)."""
    if not (isinstance(halves, types.IntegerLiteral) and halves.literal_value in (2, 4)):
        return None
    if not (isinstance(kv, types.Array) and kv.dtype == types.int8 and isinstance(xq, types.Array)
            and xq.dtype == types.int16 and isinstance(k_scales, types.Array) and k_scales.dtype == types.float32
            and isinstance(out, types.Array) and out.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        t_kv, t_k0, t_q, t_q0, _, t_ks, t_sq, t_out, t_o0 = sig.args
        v_kv, v_k0, v_q, v_q0, _, v_ks, v_sq, v_out, v_o0 = args
        n_half = halves.literal_value
        row = 32 * n_half + SCALE_BYTES
        i16, i32 = ir.IntType(16), ir.IntType(32)
        v16i, v16f = ir.VectorType(i32, 16), ir.VectorType(ir.FloatType(), 16)
        v32b, v32w = ir.VectorType(ir.IntType(8), 32), ir.VectorType(i16, 32)
        as64 = lambda v, t: context.cast(builder, v, t, types.int64)  # noqa: E731
        k0, q0 = as64(v_k0, t_k0), as64(v_q0, t_q0)
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpwssd.512")
        qv = [builder.bitcast(builder.load(element_ptr(context, builder, t_q, v_q, q0, types.int64, v32w,
                                                       offset=32 * h), align=2), v16i) for h in range(n_half)]
        leaves = []
        for j in range(KEYS):
            acc = ir.Constant(v16i, None)
            for h in range(n_half):
                codes = builder.load(element_ptr(context, builder, t_kv, v_kv, k0, types.int64, v32b,
                                                 offset=row * j + 32 * h), align=1)
                acc = builder.call(dp, [acc, builder.bitcast(builder.sext(codes, v32w), v16i), qv[h]])
            leaves.append(acc)
        sums = emit_folded_scores(builder, leaves, builder.add)
        ks = builder.load(element_ptr(context, builder, t_ks, v_ks, ir.Constant(ir.IntType(64), 0), types.int64,
                                      v16f), align=4)
        s_q = context.cast(builder, v_sq, t_sq, types.float32)
        splat = builder.insert_element(ir.Constant(v16f, ir.Undefined), s_q, ir.Constant(i32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(v16i, None))
        scores = builder.fmul(builder.fmul(builder.sitofp(sums, v16f), ks), splat)
        builder.store(scores, element_ptr(context, builder, t_out, v_out, as64(v_o0, t_o0), types.int64, v16f),
                      align=4)
        return context.get_dummy_value()

    return types.void(kv, k0, xq, q0, halves, k_scales, s_q, out, o0), codegen


@njit(cache=True, fastmath=FASTMATH)
def prepare_q_i8(q_flat, t, hk, n_heads, scale, xq, q_row, q_scales):
    """Decode row ``t``'s query heads of kv head ``hk`` times ``scale`` as int16 codes and scales."""
    dim = q_row.shape[0]
    group = q_scales.shape[0]
    for g in range(group):
        base = (t * n_heads + hk * group + g) * dim
        amax = np.float32(0.0)
        for d in range(dim):
            q_row[d] = q_flat[base + d] * scale
            amax = max(amax, abs(q_row[d]))
        inv = np.float32(Q_MAX) / amax if amax > 0 else np.float32(0.0)
        for d in range(dim):
            xq[g * dim + d] = np.int16(np.rint(q_row[d] * inv))
        q_scales[g] = amax / np.float32(Q_MAX)


@njit(cache=True, inline="always")
def run_keys_i8(kv, kv_flat, row, k_scales):
    """The scales of the 16 cache rows from ``row`` (flat row index of K), for every head's scores."""
    row_len = kv.shape[4]
    for e in range(KEYS):
        k_scales[e] = row_scale(kv_flat, (row + e) * row_len + row_len - SCALE_BYTES)


@njit(cache=True, inline="always")
def run_scores_i8(kv, kv_flat, row, g, xq, q_scales, k_scales, out, o0):
    """Query head ``g``'s scores of the 16 keys from cache row ``row`` into ``out[o0:o0 + 16]``."""
    dim = kv.shape[4] - SCALE_BYTES
    if dim == 64:
        _key_scores_i8(kv_flat, row * kv.shape[4], xq, g * dim, 2, k_scales, q_scales[g], out, o0)
    else:
        _key_scores_i8(kv_flat, row * kv.shape[4], xq, g * dim, 4, k_scales, q_scales[g], out, o0)
