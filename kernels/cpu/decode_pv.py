"""A decode's ``p @ V`` with its accumulators held in registers.

One decode row of a kv head multiplies every query head of its GQA group (``group`` rows of
probabilities) by the same V rows. Written as Numba loops, LLVM keeps ``acc[g, :]`` in memory and
widens each bf16 V row once per query head; here an llvmlite intrinsic (``_pv_keys``) loads the
accumulators of up to ``ACC_VECTORS`` 16-lane vectors once per block, widens each V row once (a
16-bit shift: exact), and runs one fused multiply-add per (query head, 16 dims) and key:
3.4 us to 1.1 us for 256 keys x 3 heads x 64 dims on Zen 4. An int8 cache (``kv_int8``) widens each
code to float32 and folds its row's scale into the probability. Head sizes 64, 128 and 256 take it;
others take the plain loop. Each key is added in order, so the result
depends only on the row's own keys, never on the batch.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.bf16 import as_f32 as _f32
from edgellm.kernels.cpu.kv_int8 import SCALE_BYTES, scale_of
from edgellm.kernels.cpu.unmanaged import flat

ACC_VECTORS = 16  # accumulators kept in registers: half of AVX-512's 32 vector registers
_VECS = (4, 8, 16)  # 16-float vectors per row: head sizes 64, 128, 256
_FORMS = [32 * heads + vecs for vecs in _VECS for heads in range(1, ACC_VECTORS // vecs + 1)]


@intrinsic
def _pv_keys(typingctx, kv, v0, n, p, p0, p_stride, acc, a0, form):
    """``acc[a0 + g D + d] += sum_{j < n} p[p0 + g p_stride + j] * float(kv[v0 + j D + d])`` for
    ``g < heads``, ``d < D = 16 vecs``, where ``form = 32 heads + vecs`` is one of ``_FORMS`` (a
    run-time value; each form is a body of its own). ``kv`` is flat bf16 bits (uint16) or float32;
    or int8 rows of ``D + 4`` bytes, where ``p[.. + j]`` is scaled by row ``j``'s scale and ``v0`` is
    a byte index. ``p`` and ``acc`` are flat float32."""
    if not (isinstance(kv, types.Array) and kv.ndim == 1
            and kv.dtype in (types.uint16, types.float32, types.int8)):
        return None
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32 for a in (p, acc)):
        return None

    def codegen(context, builder, sig, args):
        t_kv, t_v0, t_n, t_p, t_p0, t_ps, t_acc, t_a0, t_form = sig.args
        v_kv, v_v0, v_n, v_p, v_p0, v_ps, v_acc, v_a0, v_form = args
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16f, v16i, v16h = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(ir.IntType(16), 16)
        as64 = lambda v, t: context.cast(builder, v, t, types.int64)  # noqa: E731
        v0, n, p0, ps, a0 = (as64(v, t) for v, t in ((v_v0, t_v0), (v_n, t_n), (v_p0, t_p0), (v_ps, t_ps),
                                                     (v_a0, t_a0)))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        bf16, int8 = t_kv.dtype == types.uint16, t_kv.dtype == types.int8
        v16b = ir.VectorType(ir.IntType(8), 16)
        shift = ir.Constant(v16i, [16] * 16)
        splat_mask = ir.Constant(ir.VectorType(i32, 16), [0] * 16)

        def emit(form):
            heads, vecs = divmod(form, 32)
            dim = 16 * vecs
            stride = dim + SCALE_BYTES if int8 else dim
            ptrs = [[element_ptr(context, builder, t_acc, v_acc, a0, types.int64, v16f, offset=g * dim + 16 * v)
                     for v in range(vecs)] for g in range(heads)]
            regs = [[cgutils.alloca_once(builder, v16f) for _ in range(vecs)] for _ in range(heads)]
            for g in range(heads):
                for v in range(vecs):
                    builder.store(builder.load(ptrs[g][v], align=4), regs[g][v])
            with cgutils.for_range(builder, n) as loop:
                j = loop.index
                row = builder.add(v0, builder.mul(j, ir.Constant(i64, stride)))
                vals = []
                for v in range(vecs):
                    if int8:
                        raw = builder.load(element_ptr(context, builder, t_kv, v_kv, row, types.int64, v16b,
                                                       offset=16 * v), align=1)
                        vals.append(builder.sitofp(raw, v16f))
                    elif bf16:
                        raw = builder.load(element_ptr(context, builder, t_kv, v_kv, row, types.int64, v16h,
                                                       offset=16 * v), align=2)
                        wide = builder.shl(builder.zext(raw, v16i), shift)
                        vals.append(builder.bitcast(wide, v16f))
                    else:
                        vals.append(builder.load(element_ptr(context, builder, t_kv, v_kv, row, types.int64, v16f,
                                                             offset=16 * v), align=4))
                for g in range(heads):
                    at = builder.add(builder.add(p0, builder.mul(ir.Constant(i64, g), ps)), j)
                    pj = builder.load(element_ptr(context, builder, t_p, v_p, at, types.int64, f32), align=4)
                    if int8:
                        pj = builder.fmul(pj, builder.load(element_ptr(context, builder, t_kv, v_kv, row, types.int64,
                                                                       f32, offset=dim), align=1))
                    pv = builder.shuffle_vector(builder.insert_element(ir.Constant(v16f, None), pj,
                                                                       ir.Constant(i32, 0)),
                                                ir.Constant(v16f, None), splat_mask)
                    for v in range(vecs):
                        builder.store(builder.call(fma, [pv, vals[v], builder.load(regs[g][v])]), regs[g][v])
            for g in range(heads):
                for v in range(vecs):
                    builder.store(builder.load(regs[g][v]), ptrs[g][v], align=4)

        emit_cases(builder, context.cast(builder, v_form, t_form, types.int64), _FORMS, emit)
        return context.get_dummy_value()

    return types.void(kv, v0, n, p, p0, p_stride, acc, a0, form), codegen


@njit(cache=True)
def decode_pv(kv, table, lo, hi, hk, scores, acc):
    """``acc[g] += sum_j scores[g, j] V[lo + j]`` over keys ``lo:hi`` of kv head ``hk`` (a decode's
    ``p @ V`` from the cache ``kv [2, blocks, Hkv, block_size, D]``; ``scores [group, >= hi - lo]``
    and ``acc [group, D]`` float32; an int8 cache's rows are ``D + 4`` long)."""
    group, head_dim = acc.shape
    block_size, n_kv, n_blocks, row = kv.shape[3], kv.shape[2], kv.shape[1], kv.shape[4]
    vecs = head_dim // 16
    if head_dim % 16 != 0 or not (vecs == 4 or vecs == 8 or vecs == 16):
        _decode_pv_loop(kv, table, lo, hi, hk, scores, acc)
        return
    per = ACC_VECTORS // vecs
    kv_flat, p, a = flat(kv), flat(scores), flat(acc)
    stride = scores.shape[1]
    for bi in range(lo // block_size, (hi - 1) // block_size + 1):
        base = bi * block_size
        j, j1 = max(lo - base, 0), min(hi - base, block_size)
        v0 = (((n_blocks + table[bi]) * n_kv + hk) * block_size + j) * row  # kv[1, table[bi], hk, j]
        for g0 in range(0, group, per):
            heads = min(per, group - g0)
            _pv_keys(kv_flat, v0, j1 - j, p, g0 * stride + base + j - lo, stride, a, g0 * head_dim, 32 * heads + vecs)


@njit(cache=True)
def _decode_pv_loop(kv, table, lo, hi, hk, scores, acc):
    """``decode_pv`` for any head size: V widened element by element, lanes over dims."""
    group, head_dim = acc.shape
    block_size = kv.shape[3]
    for bi in range(lo // block_size, (hi - 1) // block_size + 1):
        vb = kv[1, table[bi], hk]
        base = bi * block_size
        for j in range(max(lo - base, 0), min(hi - base, block_size)):
            for g in range(group):
                pj = scores[g, base + j - lo] * scale_of(vb, j, head_dim)
                for d in range(head_dim):
                    acc[g, d] += pj * _f32(vb[j, d])
