"""Q8_0 weights on the CPU in Numba: matmul and embedding gather without dequantizing the matrix.

GGML's 34-byte blocks are repacked once into ``qs int8 [N, K]`` and ``d float32 [N, K/32]``, so a row
is contiguous int8 (1 byte per weight read from memory, the cost that bounds decode). Each weight row
is widened to float32 once into an L1-resident buffer and then dotted with up to four activation rows
at a time, so the row is read from memory once per call for any M. Products are the reference's
``(d * q) * x`` exactly; only the order of the float32 sums differs.

Example::

    qs, d = repack_q8_0(raw_blocks)          # uint8 [N, K/32*34] -> int8 [N, K], float32 [N, K/32]
    y = np.empty((x.shape[0], qs.shape[0]), np.float32)
    q8_0_matmul(x, qs, d, y, 2)              # y = x @ dequant(W)^T
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgellm.kernels.cpu.bf16 import round_bits, widen_bits
from edgellm.kernels.cpu.paged_attention import FASTMATH

QK = 32  # weights per GGML block
ROWS_PER_TASK = 64  # output features per parallel task: 36 KiB of int8 at K=576, enough to amortize


def repack_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML Q8_0 bytes ``uint8 [N, K/32*34]`` -> ``(qs int8 [N, K], d float32 [N, K/32])``."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, QK + 2)
    qs = np.empty((n, blocks.shape[1] * QK), np.uint8)
    d_bits = np.empty((n, blocks.shape[1]), np.uint16)
    _split_q8_0(blocks, qs, d_bits)
    return qs.view(np.int8), d_bits.view(np.float16).astype(np.float32)


@njit(cache=True, parallel=True, nogil=True)
def _split_q8_0(blocks: np.ndarray, qs: np.ndarray, d_bits: np.ndarray) -> None:
    """Blocks ``[N, K/32, 34]`` -> quants ``[N, K]`` and float16 scale bits ``[N, K/32]``, parallel over
    rows: numpy's strided copies took ~0.05-0.09 s of start-up for SmolLM2's 28 MB head."""
    n, nb, _ = blocks.shape
    for r in prange(n):
        for b in range(nb):
            d_bits[r, b] = np.uint16(blocks[r, b, 0]) | (np.uint16(blocks[r, b, 1]) << 8)
            for i in range(QK):
                qs[r, b * QK + i] = blocks[r, b, 2 + i]


@njit(cache=True, parallel=True)
def q8_0_row_int8(qs: np.ndarray, d: np.ndarray, qw: np.ndarray, scale_bits: np.ndarray, err_norm: np.ndarray,
                  w_norm: np.ndarray) -> None:
    """Requantize Q8_0 rows ``w = d * qs`` to one int8 scale per row, in float64 (exact inputs).

    ``scale = bf16(max |w| / 127)`` (through float32, as torch converts a double to bf16),
    ``qw = clamp(round_half_even(w / scale), -127, 127)``; ``err_norm = ||w - qw * scale||`` and
    ``w_norm = ||qw * scale||`` in float64, for the caller to round up to float32.
    """
    n, k = qs.shape
    for r in prange(n):
        amax = 0.0
        for i in range(k):
            amax = max(amax, abs(np.float64(qs[r, i]) * np.float64(d[r, i // QK])))
        bits = round_bits(np.float32(amax / 127.0))
        scale = np.float64(widen_bits(bits))
        err = 0.0
        norm = 0.0
        for i in range(k):
            w = np.float64(qs[r, i]) * np.float64(d[r, i // QK])
            q = min(127.0, max(-127.0, np.rint(w / scale))) if scale > 0 else 0.0
            approx = q * scale
            qw[r, i] = np.int8(q)
            err += (w - approx) * (w - approx)
            norm += approx * approx
        scale_bits[r] = bits
        err_norm[r] = np.sqrt(err)
        w_norm[r] = np.sqrt(norm)


@njit(cache=True, fastmath=FASTMATH)
def _dequant_row(qs: np.ndarray, d: np.ndarray, n: int, w: np.ndarray, qk: int = QK) -> None:
    """``w = d[n] * qs[n]`` as float32. Widen in one flat loop, then scale block by block; ``qk`` is
    an argument so LLVM vectorizes the scale loop instead of unrolling 32 scalar multiplies."""
    row = qs[n]
    for i in range(row.shape[0]):
        w[i] = np.float32(row[i])
    for b in range(d.shape[1]):
        scale = d[n, b]
        for i in range(b * qk, b * qk + qk):
            w[i] *= scale


@njit(cache=True, fastmath=FASTMATH)
def _rows_times_w(x: np.ndarray, w: np.ndarray, out: np.ndarray, n: int) -> None:
    """``out[:, n] = x @ w``, four rows per pass so each loaded ``w`` vector feeds four FMAs."""
    m_all, k = x.shape
    m = 0
    while m + 4 <= m_all:
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for i in range(k):
            wi = w[i]
            a0 += x[m, i] * wi
            a1 += x[m + 1, i] * wi
            a2 += x[m + 2, i] * wi
            a3 += x[m + 3, i] * wi
        out[m, n] = a0
        out[m + 1, n] = a1
        out[m + 2, n] = a2
        out[m + 3, n] = a3
        m += 4
    while m < m_all:
        a = np.float32(0.0)
        for i in range(k):
            a += x[m, i] * w[i]
        out[m, n] = a
        m += 1


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def q8_0_matmul(x: np.ndarray, qs: np.ndarray, d: np.ndarray, out: np.ndarray, n_tasks_hint: int) -> None:
    """``out[M, N] = x[M, K] @ (d * qs)^T`` in float32, parallel over blocks of output features.

    ``n_tasks_hint`` is the thread count; rows are split into at least that many tasks.
    """
    n_rows, k = qs.shape
    rows_per_task = min(ROWS_PER_TASK, max(1, (n_rows + n_tasks_hint - 1) // n_tasks_hint))
    n_tasks = (n_rows + rows_per_task - 1) // rows_per_task
    for t in prange(n_tasks):
        w = np.empty(k, np.float32)
        for n in range(t * rows_per_task, min((t + 1) * rows_per_task, n_rows)):
            _dequant_row(qs, d, n, w)
            _rows_times_w(x, w, out, n)


@njit(cache=True, fastmath=FASTMATH)
def q8_0_rows(qs: np.ndarray, d: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """Embedding lookup on the packed layout: ``out[t] = d[ids[t]] * qs[ids[t]]``."""
    for t in range(ids.shape[0]):
        _dequant_row(qs, d, ids[t], out[t])


@njit(cache=True, fastmath=FASTMATH)
def q8_0_rows_raw(raw: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """Embedding lookup straight from GGML Q8_0 bytes ``uint8 [N, K/32*34]``, no repacked copy.

    The block scale is an IEEE half; it is widened to float32 bit by bit (exact) because Numba has no
    float16 arithmetic on the CPU.
    """
    nb = raw.shape[1] // (QK + 2)
    bits = np.empty(1, np.uint32)
    as_f32 = bits.view(np.float32)
    for t in range(ids.shape[0]):
        row = ids[t]
        for b in range(nb):
            o = b * (QK + 2)
            h = np.uint32(raw[row, o]) | (np.uint32(raw[row, o + 1]) << np.uint32(8))
            sign = (h & np.uint32(0x8000)) << np.uint32(16)
            exp = (h >> np.uint32(10)) & np.uint32(0x1F)
            mant = h & np.uint32(0x3FF)
            if exp == 0:  # zero or subnormal: mant * 2^-24
                scale = np.float32(mant) * np.float32(5.9604644775390625e-08)
                if sign:
                    scale = -scale
            else:
                exp32 = np.uint32(0xFF) if exp == 31 else exp + np.uint32(112)
                bits[0] = sign | (exp32 << np.uint32(23)) | (mant << np.uint32(13))
                scale = as_f32[0]
            for i in range(QK):
                q = np.int8(raw[row, o + 2 + i])
                out[t, b * QK + i] = scale * np.float32(q)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def q8_0_dequantize(qs: np.ndarray, d: np.ndarray, n0: int, out: np.ndarray) -> None:
    """``out[i] = d[n0 + i] * qs[n0 + i]``: rows of the float32 weight, for tiled large-M matmuls."""
    for i in prange(out.shape[0]):
        _dequant_row(qs, d, n0 + i, out[i])


# Per-row error terms of an approximate head, relative to its activations' norm: the int8 GEMV may
# widen weights to bf16 (2^-8) and sums 576+ products in float32 (K * 2^-24 each, twice for the exact
# side's own rounding). Output rounding to bf16 is bounded separately, relative to the logit.
APPROX_REL = 2.0 ** -8
APPROX_OUT_REL = 2.0 ** -7


@njit(inline="always")
def _approx_error(logit, err_norm, w_norm, x_n, act_n, out_rel):
    return x_n * err_norm + act_n * w_norm + abs(logit) * out_rel


def q8_0_rescore(x: np.ndarray, x_used: np.ndarray, qs: np.ndarray, d: np.ndarray, err_norm: np.ndarray,
                 w_norm: np.ndarray, n_valid: int, logits: np.ndarray, best: np.ndarray, max_candidates: int = 0) -> int:
    """Make each row's argmax over ``logits[:, :n_valid]`` that of the exact Q8_0 logits, and write
    it to ``best [M]`` (int64; the first index among equal maxima, as ``torch.argmax``).

    ``logits`` come from an approximate head (per-row int8 weights ``w'``, bf16 activations
    ``x_used``); ``err_norm[n] = ||w_n - w'_n||`` and ``w_norm[n] = ||w'_n||``. By Cauchy-Schwarz the
    error of entry ``n`` is at most ``eps_n = ||x|| err_norm[n] + (||x - x_used|| + c ||x_used||)
    w_norm[n] + |logit| 2^-7``. Every entry that could reach the largest lower bound is recomputed
    exactly (as ``q8_0_matmul`` would); the others stay approximations below the exact maximum, so
    the best recomputed entry is the row's exact argmax.
    Rows are independent: from ``RESCORE_PARALLEL_ROWS`` rows they are shared among threads.
    Returns how many entries were recomputed.

    With ``max_candidates > 0`` a row with more candidates than that is left as it came and its
    ``best`` set to -1: coarse activations can leave thousands of near-ties on a flat row (up to a
    third of a 49k vocabulary), and the caller recomputes such a row with finer ones for less.
    """
    args = (x, x_used, qs, d, err_norm, w_norm, n_valid, logits, best, max_candidates)
    return _rescore_parallel(*args) if x.shape[0] >= RESCORE_PARALLEL_ROWS else _rescore_serial(*args)


RESCORE_PARALLEL_ROWS = 4
# The bounds pass keeps LANES running maxima (one vector) and each CHUNK's largest upper bound, so
# the recompute pass visits only the chunks that can hold a candidate.
LANES = 16
CHUNK = 256


@njit(inline="always")
def _bounds(row, err_norm, w_norm, x_n, act_n, out_rel, n0, lanes, highs):
    """Fold entries ``n0 : n0 + LANES`` into the lane-wise lower-bound and upper-bound maxima."""
    for j in range(LANES):
        v = row[n0 + j]
        e = _approx_error(v, err_norm[n0 + j], w_norm[n0 + j], x_n, act_n, out_rel)
        lanes[j] = max(lanes[j], v - e)
        highs[j] = max(highs[j], v + e)


@njit(inline="always")
def _candidates(row, err_norm, w_norm, x_n, act_n, out_rel, n_valid, chunk_high, chunk, lower, cap):
    """How many entries could reach ``lower`` (counted only once the chunks of ``chunk`` entries that
    can hold one span more than ``cap`` entries: below that the count cannot pass it)."""
    n_chunks = -(-n_valid // chunk)
    span = 0
    for ci in range(n_chunks):
        if chunk_high[ci] >= lower:
            span += min(chunk, n_valid - ci * chunk)
    if span <= cap:
        return span
    count = 0
    for ci in range(n_chunks):
        if chunk_high[ci] < lower:
            continue
        for n in range(ci * chunk, min(ci * chunk + chunk, n_valid)):
            if row[n] + _approx_error(row[n], err_norm[n], w_norm[n], x_n, act_n, out_rel) >= lower:
                count += 1
    return count


@njit(inline="always")
def _row_norms(x, x_used):
    """``(||x||, ||x - x_used|| + c ||x_used||)`` of one row, each widened a little: the factors of
    ``err_norm`` and ``w_norm`` in an entry's error bound."""
    k = x.shape[0]
    c = np.float32(APPROX_REL + 2.0 * k * 2.0 ** -24)
    xx = np.float32(0.0)
    dd = np.float32(0.0)
    uu = np.float32(0.0)
    for i in range(k):
        xx += x[i] * x[i]
        diff = x[i] - x_used[i]
        dd += diff * diff
        uu += x_used[i] * x_used[i]
    # a float32 sum of squares can round low by ~k ulps: widen the norms a little
    return np.float32(np.sqrt(xx) * 1.001), np.float32((np.sqrt(dd) + c * np.sqrt(uu)) * 1.001)


@njit(cache=True, fastmath=FASTMATH)
def row_norms(x: np.ndarray, x_used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x_n [M], act_n [M])``: ``_row_norms`` of every row, for a head that bounds as it stores."""
    x_n = np.empty(x.shape[0], np.float32)
    act_n = np.empty(x.shape[0], np.float32)
    for m in range(x.shape[0]):
        x_n[m], act_n[m] = _row_norms(x[m], x_used[m])
    return x_n, act_n


@njit(cache=True, fastmath=FASTMATH)
def _rescore_row(x, x_used, qs, d, err_norm, w_norm, n_valid, row, w, chunk_high, cap):
    """``q8_0_rescore`` for one row: ``x``, ``x_used`` and ``row`` are that row's; ``w`` and
    ``chunk_high`` (one per CHUNK entries) are scratch. Returns (recomputed, argmax), or (0, -1) with
    ``row`` untouched where ``cap > 0`` and more than ``cap`` entries would be recomputed."""
    x_n, act_n = _row_norms(x, x_used)
    out_rel = np.float32(APPROX_OUT_REL)
    lanes = np.full(LANES, -np.inf, np.float32)
    highs = np.empty(LANES, np.float32)
    n_chunks = -(-n_valid // CHUNK)
    for ci in range(n_chunks):
        c0, c1 = ci * CHUNK, min(ci * CHUNK + CHUNK, n_valid)
        highs[:] = -np.inf
        n = c0
        while n + LANES <= c1:
            _bounds(row, err_norm, w_norm, x_n, act_n, out_rel, n, lanes, highs)
            n += LANES
        high = highs.max()
        for m in range(n, c1):  # a ragged end
            e = _approx_error(row[m], err_norm[m], w_norm[m], x_n, act_n, out_rel)
            lanes[0] = max(lanes[0], row[m] - e)
            high = max(high, row[m] + e)
        chunk_high[ci] = high
    return _recompute(x, qs, d, err_norm, w_norm, x_n, act_n, n_valid, row, w, chunk_high, CHUNK, lanes.max(), cap)


@njit(cache=True, fastmath=FASTMATH)
def _recompute(x, qs, d, err_norm, w_norm, x_n, act_n, n_valid, row, w, chunk_high, chunk, lower, cap):
    """The exact logit of every entry of ``row`` whose upper bound reaches ``lower``, visiting only the
    chunks of ``chunk`` entries whose largest upper bound (``chunk_high``) does: ``_rescore_row``'s
    second pass, and all of ``q8_0_rescore_screened``'s."""
    k = x.shape[0]
    out_rel = np.float32(APPROX_OUT_REL)
    if cap > 0 and _candidates(row, err_norm, w_norm, x_n, act_n, out_rel, n_valid, chunk_high, chunk, lower,
                               cap) > cap:
        return 0, -1
    recomputed = 0
    best, best_value = -1, -np.inf
    for ci in range(-(-n_valid // chunk)):
        if chunk_high[ci] < lower:
            continue
        for n in range(ci * chunk, min(ci * chunk + chunk, n_valid)):
            if row[n] + _approx_error(row[n], err_norm[n], w_norm[n], x_n, act_n, out_rel) >= lower:
                _dequant_row(qs, d, n, w)
                a = np.float32(0.0)
                for i in range(k):
                    a += x[i] * w[i]
                row[n] = a
                recomputed += 1
                if a > best_value or best < 0:
                    best, best_value = n, a
    return recomputed, best


@njit(cache=True)
def _rescore_serial(x, x_used, qs, d, err_norm, w_norm, n_valid, logits, best, cap):
    w = np.empty(x.shape[1], np.float32)
    chunk_high = np.empty(-(-n_valid // CHUNK), np.float32)
    recomputed = 0
    for m in range(x.shape[0]):
        r, best[m] = _rescore_row(x[m], x_used[m], qs, d, err_norm, w_norm, n_valid, logits[m], w, chunk_high, cap)
        recomputed += r
    return recomputed


@njit(cache=True, parallel=True)
def _rescore_parallel(x, x_used, qs, d, err_norm, w_norm, n_valid, logits, best, cap):
    recomputed = 0
    for m in prange(x.shape[0]):
        w = np.empty(x.shape[1], np.float32)
        chunk_high = np.empty(-(-n_valid // CHUNK), np.float32)
        r, best[m] = _rescore_row(x[m], x_used[m], qs, d, err_norm, w_norm, n_valid, logits[m], w, chunk_high, cap)
        recomputed += r
    return recomputed


@njit(cache=True, parallel=True)
def q8_0_rescore_screened(x, qs, d, err_norm, w_norm, x_n, act_n, n_valid, logits, lows, highs, chunk, best,
                          max_candidates=0):
    """``q8_0_rescore`` after a head that bounded its logits as it stored them (``int8_head_vnni``'s
    ``screen``): ``lows [M, C]`` and ``highs [M, C]`` hold each chunk of ``chunk`` entries' largest lower
    and upper bounds, from the row norms ``x_n``, ``act_n`` (``row_norms``), so only the recompute
    pass remains. The candidates are ``q8_0_rescore``'s up to the rounding of their bounds, and the
    argmax is the same exact one."""
    recomputed = 0
    for m in prange(x.shape[0]):
        w = np.empty(x.shape[1], np.float32)
        r, best[m] = _recompute(x[m], qs, d, err_norm, w_norm, x_n[m], act_n[m], n_valid, logits[m], w, highs[m],
                                chunk, lows[m].max(), max_candidates)
        recomputed += r
    return recomputed
