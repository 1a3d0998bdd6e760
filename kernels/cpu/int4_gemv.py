"""Packed int4 weights times a few rows (four per pass over the weight), with int16 dot products:
AVX512-VNNI ``vpdpwssd`` or, on CPUs without AVX-512 (most laptops), AVX2 ``vpmaddwd``.

One decode stream multiplies every weight by one activation: the step is a read of the weights,
and ATen's int4 kernel spends ~4x that read widening nibbles to float32 and scaling them one by
one. Here each group of 32 activations is quantized to int16 with its own scale (``x = s_g * xq``,
15 bits under the group's largest value: finer than the bf16 the activations arrive in), and the
nibbles meet them as integers. For weights ``w = scale * (q - 8) + zero`` (ATen's layout, GGML's
Q4_0/Q4_1 blocks of 32),

    sum_g w . x  =  s_g * (scale * sum(q * xq) + (zero - 8 scale) * sum(xq))

so a weight costs a quarter of a zero-masking ``vpermb``, an AND or a shift on a quarter vector
and half of one ``vpdpwssd`` (exact int32 sums), and the float work is one multiply-add per group
of 32. The result rounds once to bf16, as ATen's kernel returns it. The AVX2 body (``isa``) does the
same integer sums and the same float steps in the same order, so its bits are the AVX-512 body's; on
an AVX2 target it is 1.3-3.5x ATen's int4 kernel (1 to 16 rows, a layer stack's 120 weights).

The scale-zeros come block by block (``block_scale_zeros``: a 64-column block's groups one after
another, ``Int4PackedWeight.gemv_operands``), so each thread reads two sequential streams. In ATen's
layout (``[K/32, N]``) a block's scale-zeros are 256 bytes in each of K/32 rows ``4N`` bytes apart,
which the hardware prefetchers did not follow: one row through a cold 66 MB weight ran at 12-17 GB/s
on two Zen 4 cores, 18-34 GB/s block by block (alternating runs; ``torch.sum`` reads 29-32 GB/s).

Example::

    int4_gemv(x_bf16_bits, packed, sz_blocks, out_bf16_bits, 2)   # Int4PackedWeight.gemv_operands
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.activations import silu_and_mul
from edgellm.kernels.cpu.amx import element_ptr, emit_cases
from edgellm.kernels.cpu.isa import dot_i16_pairs, has
from edgellm.kernels.cpu.norm_rope import add_rms_norm
from edgellm.kernels.cpu.prefetch import CACHE_LINE, emit_prefetch
from edgellm.kernels.cpu.vec16 import splat

MAX_ROWS = 4  # activation rows per pass over a weight block: 4 x 4 int32 + 4 x 4 float32 accumulators
GROUP = 32
# weight bytes ahead to prefetch at each group: one core's hardware prefetchers alone stream a decode
# step's weights at ~7 GB/s; with these, a layer's four 1-row products 185 -> 155 us (AMX Xeon VM)
PREFETCH_BYTES = 8192
XQ_MAX = 32767  # 32 products of a nibble (<= 15) and |xq| <= 32767 stay far inside int32


@functools.cache
def isa() -> str | None:
    """Which body ``_block_rows`` compiles to on this target: ``"avx512"`` (AVX512-VNNI and VBMI: Intel
    Ice Lake and later, AMD Zen 4), ``"avx2"`` (AVX2 and FMA: most laptops and desktops since 2013),
    or None (no kernel: ATen's int4 kernel takes these rows)."""
    if has("avx512vnni", "avx512vbmi", "avx512bw"):
        return "avx512"
    if has("avx2", "fma"):
        return "avx2"
    return None


def supported() -> bool:
    """Whether ``int4_gemv`` compiles on this target (``isa``)."""
    return isa() is not None


def _block_rows_types(rows, packed, xq, xs, xsum, sz, out) -> bool:
    arrays = (packed, xq, xs, xsum, sz, out)
    dtypes = (types.uint8, types.int16, types.float32, types.float32, types.uint32, types.uint16)
    # the scale-zeros block by block are 3-D: ATen's 2-D layout (``amx_operands``) does not type here
    return isinstance(rows, types.Integer) and sz.ndim == 3 and all(
        isinstance(a, types.Array) and a.layout == "C" and a.dtype == d for a, d in zip(arrays, dtypes))


@intrinsic
def _block_rows(typingctx, packed, block, xq, xs, xsum, rows, sz, out):
    """``out[r, 64 block + c]`` (bf16 bits) for the 64 columns of one weight block and ``r < rows``
    (1-4, one body unrolled for each count): ``sum_g xs[r, g] * (scale * sum_k q xq[r, k]) + (zero -
    8 scale) * xsum[r, g]`` over the groups of 32 k, rounded to nearest even, the scale-zeros read
    from ``sz`` in ``block_scale_zeros``' layout. Both bodies (``isa``) do the same float operations
    in the same order: the same bits."""
    if not _block_rows_types(rows, packed, xq, xs, xsum, sz, out):
        return None
    codegen = _avx512_codegen if isa() == "avx512" else _avx2_codegen
    return types.void(packed, block, xq, xs, xsum, rows, sz, out), codegen


@intrinsic
def _block_rows_avx2(typingctx, packed, block, xq, xs, xsum, rows, sz, out):
    """``_block_rows``' AVX2 body on any target that has AVX2 (tests run it beside the AVX-512 one)."""
    if not _block_rows_types(rows, packed, xq, xs, xsum, sz, out):
        return None
    return types.void(packed, block, xq, xs, xsum, rows, sz, out), _avx2_codegen


def _avx512_codegen(context, builder, sig, args):
    """``_block_rows`` on 512-bit vectors: a zero-masking ``vpermb`` lays each pair of k side by side, one
    ``vpdpwssd`` a row and 16 columns. (Kept as its own body: built from the AVX2 body's group loop
    with 16 lanes, the same instructions streamed a cold chain of weights 10-25 % slower, for reasons
    not found.)"""
    t_p, t_b, t_xq, t_xs, t_xsum, _, t_sz, t_out = sig.args
    a_p, a_b, a_xq, a_xs, a_xsum, a_rows, a_sz, a_out = args
    i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    f32 = ir.FloatType()
    v16i, v16f, v64b = ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(i8, 64)
    const = lambda v: ir.Constant(i64, v)  # noqa: E731
    splat_i = lambda v: ir.Constant(v16i, [v] * 16)  # noqa: E731
    k = builder.extract_value(context.make_array(t_p)(context, builder, a_p).shape, 1)
    n = builder.extract_value(context.make_array(t_out)(context, builder, a_out).shape, 1)
    groups = builder.sdiv(k, const(GROUP))
    block = context.cast(builder, a_b, t_b, types.int64)
    col0 = builder.mul(block, const(64))
    w_base = builder.mul(builder.mul(block, k), const(32))
    dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                        "llvm.x86.avx512.vpdpwssd.512")
    # a weight pair per 32-bit lane: lane i of ``part[h]`` is the bytes [b_k[16 h + i], 0, b_k1[16 h + i], 0]
    # (one zero-masking vpermb), so each int16 holds a byte: its low nibble (an AND) is column
    # 16 h + i, its high nibble (a 16-bit shift) column 32 + 16 h + i, for k and k + 1 side by side.
    # (Dropping the AND for a correction from the high nibbles' sums measured slower from 2 rows.)
    zero = ir.Constant(v64b, None)
    pick = [[16 * h + i // 4 + (32 if i % 4 == 2 else 0) if i % 2 == 0 else 64 for i in range(64)]
            for h in range(2)]
    v32s = ir.VectorType(i16, 32)

    def widen(raw):  # 64 bytes (rows k, k + 1 of 64 columns) -> columns 0-15, 16-31, 32-47, 48-63
        parts = [builder.bitcast(builder.shuffle_vector(raw, zero, ir.Constant(ir.VectorType(i32, 64), pick[h])),
                                 v32s) for h in range(2)]
        lows = [builder.and_(p, ir.Constant(v32s, [0x0F] * 32)) for p in parts]
        highs = [builder.lshr(p, ir.Constant(v32s, [4] * 32)) for p in parts]
        return [builder.bitcast(v, v16i) for v in (*lows, *highs)]

    def body(n_rows):
        facc = [[cgutils.alloca_once_value(builder, ir.Constant(v16f, None)) for _ in range(4)]
                for _ in range(n_rows)]
        iacc = [[cgutils.alloca_once(builder, v16i) for _ in range(4)] for _ in range(n_rows)]
        with cgutils.for_range(builder, groups) as g_loop:
            g = g_loop.index
            for row in iacc:
                for acc in row:
                    builder.store(ir.Constant(v16i, None), acc)
            g_off = builder.add(w_base, builder.mul(g, const(GROUP * 32)))  # the group's 1 KiB of weights
            for line in range(0, GROUP * 32, CACHE_LINE):
                ahead = builder.add(g_off, const(PREFETCH_BYTES + line))
                emit_prefetch(builder, element_ptr(context, builder, t_p, a_p, ahead, types.int64), 3)
            with cgutils.for_range(builder, const(GROUP // 2)) as p_loop:
                kk = builder.add(builder.mul(g, const(GROUP)), builder.mul(p_loop.index, const(2)))
                raw = builder.load(element_ptr(context, builder, t_p, a_p, builder.add(w_base, builder.mul(kk, const(32))),
                                               types.int64, v64b), align=1)
                wv = widen(raw)
                for r in range(n_rows):
                    xi = builder.add(builder.mul(const(r), k), kk)
                    x2 = builder.load(element_ptr(context, builder, t_xq, a_xq, xi, types.int64, i32), align=2)
                    xb = splat(builder, x2)
                    for v in range(4):
                        builder.store(builder.call(dp, [builder.load(iacc[r][v]), wv[v], xb]), iacc[r][v])
            # the group's float step: scale and zero are each column's bf16 pair (scale low)
            sz_base = builder.mul(builder.add(builder.mul(block, groups), g), const(64))
            scales, zeros = [], []
            for v in range(4):
                si = builder.add(sz_base, const(16 * v))
                sz_v = builder.load(element_ptr(context, builder, t_sz, a_sz, si, types.int64, v16i), align=4)
                scale = builder.bitcast(builder.shl(sz_v, splat_i(16)), v16f)
                zero = builder.bitcast(builder.and_(sz_v, splat_i(-65536)), v16f)
                scales.append(scale)
                zeros.append(builder.fsub(zero, builder.fmul(scale, ir.Constant(v16f, [8.0] * 16))))
            for r in range(n_rows):
                ri = builder.add(builder.mul(const(r), groups), g)
                s = builder.load(element_ptr(context, builder, t_xs, a_xs, ri, types.int64, f32), align=4)
                xsum = builder.load(element_ptr(context, builder, t_xsum, a_xsum, ri, types.int64, f32), align=4)
                s_v = splat(builder, s)
                xsum_v = splat(builder, xsum)
                for v in range(4):
                    acc = builder.load(facc[r][v])
                    acc = builder.fadd(acc, builder.fmul(zeros[v], xsum_v))
                    ints = builder.sitofp(builder.load(iacc[r][v]), v16f)
                    acc = builder.fadd(acc, builder.fmul(ints, builder.fmul(scales[v], s_v)))
                    builder.store(acc, facc[r][v])
        for r in range(n_rows):
            for v in range(4):
                bits = builder.bitcast(builder.load(facc[r][v]), v16i)
                odd = builder.and_(builder.lshr(bits, splat_i(16)), splat_i(1))
                rounded = builder.lshr(builder.add(bits, builder.add(odd, splat_i(0x7FFF))), splat_i(16))
                oi = builder.add(builder.add(builder.mul(const(r), n), col0), const(16 * v))
                ptr = element_ptr(context, builder, t_out, a_out, oi, types.int64, ir.VectorType(i16, 16))
                builder.store(builder.trunc(rounded, ir.VectorType(i16, 16)), ptr, align=2)

    emit_cases(builder, context.cast(builder, a_rows, sig.args[5], types.int64), range(1, MAX_ROWS + 1), body)
    return context.get_dummy_value()


LANES_AVX2 = 8  # int32 lanes of the AVX2 body's vectors: 8 columns


def _block_setup(context, builder, sig, args):
    """``(k, n, groups, col0, w_base)`` of ``_block_rows``' arguments, as int64 values."""
    t_p, t_b, t_out = sig.args[0], sig.args[1], sig.args[7]
    a_p, a_b, a_out = args[0], args[1], args[7]
    i64 = ir.IntType(64)
    k = builder.extract_value(context.make_array(t_p)(context, builder, a_p).shape, 1)
    n = builder.extract_value(context.make_array(t_out)(context, builder, a_out).shape, 1)
    block = context.cast(builder, a_b, t_b, types.int64)
    return (k, n, builder.sdiv(k, ir.Constant(i64, GROUP)), builder.mul(block, ir.Constant(i64, 64)),
            builder.mul(builder.mul(block, k), ir.Constant(i64, 32)))


def _avx2_columns(h: int) -> tuple[int, ...]:
    """The column offsets (in the block) of the four vectors ``_avx2_pairs`` makes from bytes ``16 h ..
    16 h + 15`` of a weight row: low nibbles are columns ``16 h + i``, high ones ``32 + 16 h + i``."""
    return 16 * h, 16 * h + 8, 32 + 16 * h, 40 + 16 * h


def _avx2_pairs(builder, raw_k, raw_k1):
    """16 bytes of rows k and k + 1 -> four ``<16 x i16>`` vectors (``_avx2_columns``' order), each lane
    pair the weights (k, k + 1) of one column: bytes interleaved, widened to int16, then an AND for
    the low nibble or a shift for the high one."""
    v16s = ir.VectorType(ir.IntType(16), 16)
    mixed = [builder.zext(builder.shuffle_vector(raw_k, raw_k1, ir.Constant(
        ir.VectorType(ir.IntType(32), 16), [lo + i // 2 + (16 if i % 2 else 0) for i in range(16)])), v16s)
        for lo in (0, 8)]
    return ([builder.and_(v, ir.Constant(v16s, [0x0F] * 16)) for v in mixed]
            + [builder.lshr(v, ir.Constant(v16s, [4] * 16)) for v in mixed])


def _avx2_float_step(context, builder, sig, args, setup, g, cols, facc, iacc, rows):
    """A group's float step for ``rows`` and the column offsets ``cols``: ``facc += (zero - 8 scale) *
    xsum + float(iacc) * (scale * xs)`` (scale and zero are each column's bf16 pair, scale low), the
    AVX-512 body's operations in its order."""
    t_xs, t_xsum, t_sz = sig.args[3], sig.args[4], sig.args[6]
    a_xs, a_xsum, a_sz = args[3], args[4], args[6]
    _, _, groups, col0, _ = setup
    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
    vi, vf = ir.VectorType(i32, LANES_AVX2), ir.VectorType(f32, LANES_AVX2)
    block = builder.sdiv(col0, ir.Constant(i64, 64))
    sz_base = builder.mul(builder.add(builder.mul(block, groups), g), ir.Constant(i64, 64))
    scales, zeros = [], []
    for c in cols:
        si = builder.add(sz_base, ir.Constant(i64, c))
        sz_v = builder.load(element_ptr(context, builder, t_sz, a_sz, si, types.int64, vi), align=4)
        scale = builder.bitcast(builder.shl(sz_v, ir.Constant(vi, [16] * LANES_AVX2)), vf)
        zero = builder.bitcast(builder.and_(sz_v, ir.Constant(vi, [-65536] * LANES_AVX2)), vf)
        scales.append(scale)
        zeros.append(builder.fsub(zero, builder.fmul(scale, ir.Constant(vf, [8.0] * LANES_AVX2))))
    for r in rows:
        ri = builder.add(builder.mul(ir.Constant(i64, r), groups), g)
        s = builder.load(element_ptr(context, builder, t_xs, a_xs, ri, types.int64, f32), align=4)
        xsum = builder.load(element_ptr(context, builder, t_xsum, a_xsum, ri, types.int64, f32), align=4)
        s_v, xsum_v = splat(builder, s, LANES_AVX2), splat(builder, xsum, LANES_AVX2)
        for v in range(len(cols)):
            acc = builder.load(facc[r][v])
            acc = builder.fadd(acc, builder.fmul(zeros[v], xsum_v))
            ints = builder.sitofp(builder.load(iacc[r][v]), vf)
            acc = builder.fadd(acc, builder.fmul(ints, builder.fmul(scales[v], s_v)))
            builder.store(acc, facc[r][v])


def _avx2_store(context, builder, sig, args, setup, facc, rows, cols):
    """``out[r, col0 + c : + 8]``: the float accumulators rounded to bf16 (nearest even)."""
    t_out, a_out = sig.args[7], args[7]
    _, n, _, col0, _ = setup
    i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
    vi = ir.VectorType(i32, LANES_AVX2)
    splat_i = lambda v: ir.Constant(vi, [v] * LANES_AVX2)  # noqa: E731
    for r in rows:
        for v, c in enumerate(cols):
            bits = builder.bitcast(builder.load(facc[r][v]), vi)
            odd = builder.and_(builder.lshr(bits, splat_i(16)), splat_i(1))
            rounded = builder.lshr(builder.add(bits, builder.add(odd, splat_i(0x7FFF))), splat_i(16))
            oi = builder.add(builder.add(builder.mul(ir.Constant(i64, r), n), col0), ir.Constant(i64, c))
            ptr = element_ptr(context, builder, t_out, a_out, oi, types.int64, ir.VectorType(i16, LANES_AVX2))
            builder.store(builder.trunc(rounded, ir.VectorType(i16, LANES_AVX2)), ptr, align=2)


def _avx2_rows(context, builder, sig, args, rows, halves):
    """The AVX2 body's group loop for ``rows`` (row indices) and the 16-byte halves ``halves`` of each
    32-byte weight row."""
    t_p, a_p, t_xq, a_xq = sig.args[0], args[0], sig.args[2], args[2]
    setup = _block_setup(context, builder, sig, args)
    k, _, groups, _, w_base = setup
    i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    vi, vf = ir.VectorType(i32, LANES_AVX2), ir.VectorType(f32, LANES_AVX2)
    const = lambda v: ir.Constant(i64, v)  # noqa: E731
    cols = [c for h in halves for c in _avx2_columns(h)]
    facc = {r: [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in cols] for r in rows}
    iacc = {r: [cgutils.alloca_once(builder, vi) for _ in cols] for r in rows}
    with cgutils.for_range(builder, groups) as g_loop:
        g = g_loop.index
        for row in iacc.values():
            for acc in row:
                builder.store(ir.Constant(vi, None), acc)
        if halves[0] == 0:  # one pass over the block asks for what comes after it
            g_off = builder.add(w_base, builder.mul(g, const(GROUP * 32)))
            for line in range(0, GROUP * 32, CACHE_LINE):
                ahead = builder.add(g_off, const(PREFETCH_BYTES + line))
                emit_prefetch(builder, element_ptr(context, builder, t_p, a_p, ahead, types.int64), 3)
        with cgutils.for_range(builder, const(GROUP // 2)) as p_loop:
            kk = builder.add(builder.mul(g, const(GROUP)), builder.mul(p_loop.index, const(2)))
            row_k = builder.add(w_base, builder.mul(kk, const(32)))
            wv = []
            for h in halves:
                raw = [builder.load(element_ptr(context, builder, t_p, a_p, builder.add(row_k, const(32 * j + 16 * h)),
                                                types.int64, ir.VectorType(i8, 16)), align=1) for j in range(2)]
                wv += _avx2_pairs(builder, *raw)
            for r in rows:
                xi = builder.add(builder.mul(const(r), k), kk)
                x2 = builder.load(element_ptr(context, builder, t_xq, a_xq, xi, types.int64, i32), align=2)
                xb = splat(builder, x2, LANES_AVX2)
                for v, w in enumerate(wv):
                    builder.store(dot_i16_pairs(builder, builder.load(iacc[r][v]), w, xb), iacc[r][v])
        _avx2_float_step(context, builder, sig, args, setup, g, cols, facc, iacc, rows)
    _avx2_store(context, builder, sig, args, setup, facc, rows, cols)


def _avx2_codegen(context, builder, sig, args):
    """``_block_rows`` on 256-bit vectors, for CPUs without AVX-512: bytes of rows k and k + 1
    interleaved (``vpunpcklbw``/``vpunpckhbw``) and widened to int16 (``vpmovzxbw``), an AND or a
    shift for the low or high nibble, and ``vpmaddwd`` (then ``vpaddd``) a row and 8 columns.

    Sixteen registers hold one row's 8 accumulators for all 64 columns, or two rows' for half of them:
    one row takes both halves of each weight row in one pass, more rows a pass per half and pair of
    rows (the second pass reads the block from L1 or L2)."""
    def body(n_rows):
        if n_rows == 1:
            _avx2_rows(context, builder, sig, args, [0], (0, 1))
            return
        for h in (0, 1):
            for r0 in range(0, n_rows, 2):
                _avx2_rows(context, builder, sig, args, list(range(r0, min(r0 + 2, n_rows))), (h,))

    emit_cases(builder, context.cast(builder, args[5], sig.args[5], types.int64), range(1, MAX_ROWS + 1), body)
    return context.get_dummy_value()


def block_scale_zeros(sz: np.ndarray) -> np.ndarray:
    """ATen's scale-zeros ``[K/32, N]`` (uint32, each the bf16 pair) as ``int4_gemv`` reads them:
    ``[N/64, K/32, 64]``, each 64-column block's groups one after another."""
    groups, n = sz.shape
    return np.ascontiguousarray(sz.reshape(groups, n // 64, 64).transpose(1, 0, 2))


@njit(cache=True)
def quantize_groups_int16(x):
    """``(xq int16 [M, K], xs, xsum float32 [M, K/32])`` from bf16 bits ``x [M, K]``: each group of 32
    is ``xs * xq`` with ``|xq| <= 32767``; ``xsum = xs * sum(xq)`` (the group's sum as multiplied)."""
    return quantize_groups_int16_f32((x.astype(np.uint32) << np.uint32(16)).view(np.float32))


@njit(cache=True)
def quantize_groups_int16_f32(xf):
    """``quantize_groups_int16`` of float32 rows ``xf [M, K]``."""
    m, k = xf.shape
    xq = np.empty((m, k), np.int16)
    xs = np.empty((m, k // GROUP), np.float32)
    xsum = np.empty((m, k // GROUP), np.float32)
    quantize_groups_int16_into(xf, xq, xs, xsum)
    return xq, xs, xsum


@njit(cache=True)
def quantize_groups_int16_into(xf, xq, xs, xsum):
    """``quantize_groups_int16_f32`` into given arrays (rows of bigger buffers, say)."""
    totals = np.empty(xs.shape, np.int32)
    quantize_groups_into(xf, XQ_MAX, xq, xs, totals)
    xsum[:] = totals.astype(np.float32) * xs


@njit(cache=True)
def quantize_groups_into(xf, limit, xq, s, totals):
    """Each group of 32 of the float32 rows ``xf [M, K]`` as ``s[r, g] * xq`` with ``|xq| <= limit``
    (``xq`` int8 or int16 ``[M, K]``, ``s`` float32 ``[M, K/32]``), and the group's ``sum(xq)`` in
    ``totals`` (int32 ``[M, K/32]``): the activations of the integer dot-product kernels."""
    m, k = xf.shape
    for r in range(m):
        for g in range(k // GROUP):
            amax = np.float32(0.0)
            for i in range(g * GROUP, (g + 1) * GROUP):
                amax = max(amax, abs(xf[r, i]))
            scale = np.float32(amax / limit) if amax > 0 else np.float32(1.0)
            inv = np.float32(1.0) / scale
            total = 0
            for i in range(g * GROUP, (g + 1) * GROUP):
                q = min(limit, max(-limit, np.int32(np.rint(xf[r, i] * inv))))
                xq[r, i] = q
                total += q
            s[r, g] = scale
            totals[r, g] = total


@njit(cache=True, parallel=True)
def int4_gemv(x: np.ndarray, packed: np.ndarray, sz: np.ndarray, out: np.ndarray, n_threads: int) -> None:
    """``out [M, N] = x [M, K] @ W^T`` in bf16 bits (uint16, C-contiguous), ``M <= 4`` at a time is
    best (more rows take more passes), ``N % 64 == 0``, ``K % 32 == 0``.

    ``packed`` is ATen's int4 weight viewed as ``[N/64, K, 32]``, ``sz`` its scale-zeros (each the bf16
    pair as uint32) block by block, ``[N/64, K/32, 64]`` (``block_scale_zeros``):
    ``Int4PackedWeight.gemv_operands``. Each thread takes a run of 64-column blocks.
    """
    blocks = packed.shape[0]
    if (x.shape[1] != packed.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != 64 * blocks
            or sz.shape[0] != blocks or sz.shape[1] * GROUP != packed.shape[1] or sz.shape[2] != 64):
        raise ValueError("int4_gemv: x [M, K], packed [N/64, K, 32], sz [N/64, K/32, 64] and out [M, N] disagree")
    xq, xs, xsum = quantize_groups_int16(x)
    m = x.shape[0]
    workers = max(1, min(n_threads, blocks))
    for w in prange(workers):
        for b in range(w * blocks // workers, (w + 1) * blocks // workers):
            for r0 in range(0, m, MAX_ROWS):
                r1 = min(m, r0 + MAX_ROWS)
                _block_rows(packed, b, xq[r0:r1], xs[r0:r1], xsum[r0:r1], r1 - r0, sz, out[r0:r1])


@njit(cache=True)
def norm_int4_gemv(h, residual, norm_w, eps, has_residual, packed, sz, out, n_threads):
    """``add_rms_norm`` (its output rounded to bf16, as the separate op returns it) then ``int4_gemv``
    on it, in one dispatch: a decode step's pre-projection norm and projection."""
    x = np.empty(h.shape, np.uint16)
    add_rms_norm(h, residual, norm_w, eps, x, has_residual)
    int4_gemv(x, packed, sz, out, n_threads)


@njit(cache=True)
def silu_int4_gemv(gate_up, packed, sz, out, n_threads):
    """``silu_and_mul`` (bf16 bits in and out) then ``int4_gemv``, in one dispatch: a decode step's
    gated MLP after its gate/up projection."""
    x = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.uint16)
    silu_and_mul(gate_up, x)
    int4_gemv(x, packed, sz, out, n_threads)
