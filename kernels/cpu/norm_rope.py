"""Fused row-wise kernels for the small per-layer ops of a decode step.

A decode step of a small model is dominated by per-op dispatch, not arithmetic: the reference
residual-add + RMSNorm is ~8 ATen ops and the rotary embedding ~15, for every layer. One Numba call
each does the same work. Rows are processed independently with a fixed summation order, so a row's
result never depends on the batch around it.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from edgellm.kernels.cpu.amx import element_ptr
from edgellm.kernels.cpu.bf16 import as_f32, load_row, store_row
from edgellm.kernels.cpu.unmanaged import flat
from edgellm.kernels.cpu.vec16 import F32X16, I16X16, hreduce, load_f32x16, splat, store_f32x16


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_squares(row: np.ndarray) -> float:
    """Sum of ``row``'s squares in float64, in vector partial sums: an order fixed by this compiled
    code, the same for a row whatever batch it is in (a sequential sum stalls on each add)."""
    acc = 0.0
    for j in range(row.shape[0]):
        acc += np.float64(row[j]) * np.float64(row[j])
    return acc


F64X16 = ir.VectorType(ir.DoubleType(), 16)


def _row_pointer(context, builder, aryty, ary, index):
    """``ary.flat[index]`` as a pointer to 16 lanes: ``<16 x i16>`` for bf16 bits, else ``<16 x float>``."""
    lanes = I16X16 if aryty.dtype == types.uint16 else F32X16
    return element_ptr(context, builder, aryty, ary, index, types.int64, lanes)


@intrinsic
def _add_and_square_16(typingctx, x, residual, start, n, has_residual):
    """``residual.flat[start:start + n] = x.flat[start:start + n] (+ residual)``, float32 adds, and the
    sum of their squares in float64 (16 lane sums added in a fixed tree at the end); ``n`` a multiple
    of 16, ``x`` float32 or bf16 bits, ``residual`` float32."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 for a in (x, residual)) and residual.dtype == types.float32
            and x.dtype in (types.float32, types.uint16)):
        return None

    def codegen(context, builder, sig, args):
        t_x, t_res, t_start, t_n, _ = sig.args
        v_x, v_res, v_start, v_n, v_has = args
        i64 = ir.IntType(64)
        start = context.cast(builder, v_start, t_start, types.int64)
        vectors = builder.udiv(context.cast(builder, v_n, t_n, types.int64), ir.Constant(i64, 16))
        acc = cgutils.alloca_once_value(builder, ir.Constant(F64X16, [0.0] * 16))
        with cgutils.for_range(builder, vectors) as loop:
            at = builder.add(start, builder.mul(loop.index, ir.Constant(i64, 16)))
            v = load_f32x16(builder, _row_pointer(context, builder, t_x, v_x, at), t_x.dtype == types.uint16)
            rp = _row_pointer(context, builder, t_res, v_res, at)
            v = builder.select(v_has, builder.fadd(v, builder.load(rp, align=4)), v)
            builder.store(v, rp, align=4)
            wide = builder.fpext(v, F64X16)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(wide, wide)), acc)
        total = hreduce(builder, builder.load(acc), builder.fadd)
        return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))

    return types.float64(x, residual, start, n, has_residual), codegen


@intrinsic
def _scale_16(typingctx, residual, start, n, inv, weight, out):
    """``out.flat[start + j] = float32(residual.flat[start + j] * inv) * weight[j]`` for ``j < n`` (a
    multiple of 16), ``out`` float32 or rounded to bf16 bits."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 for a in (residual, weight, out))
            and residual.dtype == types.float32 and weight.dtype == types.float32
            and out.dtype in (types.float32, types.uint16) and inv == types.float32):
        return None

    def codegen(context, builder, sig, args):
        t_res, t_start, t_n, _, t_w, t_out = sig.args
        v_res, v_start, v_n, v_inv, v_w, v_out = args
        i64 = ir.IntType(64)
        start = context.cast(builder, v_start, t_start, types.int64)
        vectors = builder.udiv(context.cast(builder, v_n, t_n, types.int64), ir.Constant(i64, 16))
        inv = splat(builder, v_inv)
        with cgutils.for_range(builder, vectors) as loop:
            j = builder.mul(loop.index, ir.Constant(i64, 16))
            at = builder.add(start, j)
            r = builder.load(_row_pointer(context, builder, t_res, v_res, at), align=4)
            w = builder.load(_row_pointer(context, builder, t_w, v_w, j), align=4)
            store_f32x16(builder, builder.fmul(builder.fmul(r, inv), w),
                         _row_pointer(context, builder, t_out, v_out, at), t_out.dtype == types.uint16)
        return context.get_dummy_value()

    return types.void(residual, start, n, inv, weight, out), codegen


def _norm_rows_16(x, residual, weight, eps, out, has_residual):
    """``add_rms_norm`` 16 lanes at a time where every array is C-contiguous and the row length a
    multiple of 16; False (nothing done) otherwise."""
    raise NotImplementedError("only callable from Numba code")


@overload(_norm_rows_16, inline="always")
def _norm_rows_16_impl(x, residual, weight, eps, out, has_residual):
    if not all(a.layout == "C" for a in (x, residual, weight, out)):
        return lambda x, residual, weight, eps, out, has_residual: False

    def rows(x, residual, weight, eps, out, has_residual):
        n_rows, dim = x.shape
        if dim % 16 != 0:
            return False
        xf, rf, of = flat(x), flat(residual), flat(out)
        for r in range(n_rows):
            squares = _add_and_square_16(xf, rf, r * dim, dim, has_residual)
            inv = np.float32(1.0 / np.sqrt(squares / dim + eps))
            _scale_16(rf, r * dim, dim, inv, weight, of)
        return True
    return rows


@numba.njit(cache=True, fastmath=False)
def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray,
                 has_residual: bool) -> None:
    """``residual = x + residual`` (or ``x``) in place; ``out = residual * rsqrt(mean(residual^2) + eps) * w``.

    ``x`` and ``out`` may be float32 or bf16 bits (uint16); ``residual`` is float32. C-contiguous rows
    of a multiple of 16 take two 512-bit passes (``_norm_rows_16``: 1.46x on the AMX Xeon, 560 rows
    of 576), where Numba's loops made five 256-bit ones; the float64 sum of squares then adds its
    terms in another order, which moves the float32 ``rsqrt`` only where it falls within ~1e-16 of a
    rounding boundary.
    """
    if _norm_rows_16(x, residual, weight, eps, out, has_residual):
        return
    rows, dim = x.shape
    wide = np.empty(dim, np.uint32)
    normed = np.empty(dim, np.float32)
    for r in range(rows):
        xr = load_row(x[r], wide)
        for j in range(dim):
            residual[r, j] = xr[j] + residual[r, j] if has_residual else xr[j]
        inv = np.float32(1.0 / np.sqrt(_sum_squares(residual[r]) / dim + eps))
        for j in range(dim):
            normed[j] = np.float32(residual[r, j] * inv) * weight[j]
        store_row(out[r], normed)


@numba.njit(cache=True, inline="always")
def _rotate(x1: np.ndarray, x2: np.ndarray, cos: np.ndarray, sin: np.ndarray, d1: np.ndarray, d2: np.ndarray) -> None:
    """One head, half-split (NeoX/HF) layout: ``d1 = x1 c - x2 s``, ``d2 = x2 c + x1 s`` from the
    halves ``x1, x2`` (float32 or bf16 bits; ``d1, d2`` may be them). Half-row slices, not offsets
    into a row, keep the loop simple enough to vectorize."""
    for i in range(cos.shape[0]):
        a = as_f32(x1[i])
        b = as_f32(x2[i])
        d1[i] = a * cos[i] - b * sin[i]
        d2[i] = b * cos[i] + a * sin[i]


@numba.njit(cache=True)
def rope_neox(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, q_out: np.ndarray,
              k_out: np.ndarray) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` into float32 ``q_out``, ``k_out``, half-split
    (NeoX/HF) layout. Inputs may be float32 (``q_out`` may be ``q``: in place) or bf16 bits."""
    t_len, n_q, dim = q.shape
    n_k = k.shape[1]
    half = dim // 2
    for t in range(t_len):
        cs = cos_sin[positions[t]]
        cos, sin = cs[:half], cs[half:2 * half]
        for h in range(n_q):
            _rotate(q[t, h, :half], q[t, h, half:], cos, sin, q_out[t, h, :half], q_out[t, h, half:])
        for h in range(n_k):
            _rotate(k[t, h, :half], k[t, h, half:], cos, sin, k_out[t, h, :half], k_out[t, h, half:])


@numba.njit(cache=True)
def rope_neox_qk(qk: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, q_out: np.ndarray,
                 k_out: np.ndarray) -> None:
    """``rope_neox`` reading the heads straight from fused projection rows ``qk [T, >= (H + Hkv) D]``
    (C-contiguous, float32 or bf16 bits; q's heads first, then k's): whole rows widen and rotate
    in vector loops, 3x faster than through strided 3-D views of the same rows."""
    n_q, dim = q_out.shape[1], q_out.shape[2]
    n_k = k_out.shape[1]
    half = dim // 2
    for t in range(qk.shape[0]):
        cs = cos_sin[positions[t]]
        cos, sin = cs[:half], cs[half:2 * half]
        row = qk[t]
        for h in range(n_q):
            x = row[h * dim:(h + 1) * dim]
            _rotate(x[:half], x[half:], cos, sin, q_out[t, h, :half], q_out[t, h, half:])
        for h in range(n_k):
            x = row[(n_q + h) * dim:(n_q + h + 1) * dim]
            _rotate(x[:half], x[half:], cos, sin, k_out[t, h, :half], k_out[t, h, half:])


@numba.njit(cache=True, parallel=True)
def add_rms_norm_parallel(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray,
                          has_residual: bool, n_threads: int) -> None:
    """``add_rms_norm`` with the rows split into ``n_threads`` ranges (each row's numbers unchanged)."""
    rows = x.shape[0]
    for w in prange(n_threads):
        r0, r1 = w * rows // n_threads, (w + 1) * rows // n_threads
        add_rms_norm(x[r0:r1], residual[r0:r1], weight, eps, out[r0:r1], has_residual)


@numba.njit(cache=True, parallel=True)
def rope_neox_parallel(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, q_out: np.ndarray,
                       k_out: np.ndarray, n_threads: int) -> None:
    """``rope_neox`` with the tokens split into ``n_threads`` ranges."""
    rows = q.shape[0]
    for w in prange(n_threads):
        r0, r1 = w * rows // n_threads, (w + 1) * rows // n_threads
        rope_neox(q[r0:r1], k[r0:r1], positions[r0:r1], cos_sin, q_out[r0:r1], k_out[r0:r1])


@numba.njit(cache=True, parallel=True)
def rope_neox_qk_parallel(qk: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, q_out: np.ndarray,
                          k_out: np.ndarray, n_threads: int) -> None:
    """``rope_neox_qk`` with the tokens split into ``n_threads`` ranges."""
    rows = qk.shape[0]
    for w in prange(n_threads):
        r0, r1 = w * rows // n_threads, (w + 1) * rows // n_threads
        rope_neox_qk(qk[r0:r1], positions[r0:r1], cos_sin, q_out[r0:r1], k_out[r0:r1])
