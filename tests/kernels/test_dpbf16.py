"""The AVX512-BF16 kernels (CPUs without AMX) against the bf16 expansion and float64, and the
backend's choice of them.

These run where the CPU has AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later); elsewhere
the backend never calls the kernels, and they skip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_weights import Int4PackedWeight, Q8_0Weight
from edgellm.kernels.cpu.dpbf16 import (
    NO_PANELS,
    _dot_block_runs,
    _int4_panels,
    bf16_panels_matmul,
    int4_dpbf16_matmul,
    int4_dpbf16_matmul_then,
    int4_to_bf16_panels,
    int8_dpbf16_matmul,
    int8_to_bf16_panels,
    kv_runs,
    run_lines,
    supported,
)
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows
from tests.kernels.int8_head_checks import assert_greedy_head_exact, assert_matches_float64, int8_case
from tests.kernels.test_bf16_expand import assert_matches_expanded_gemm, quantized

pytestmark = pytest.mark.skipif(not supported(), reason="this CPU has no AVX512-BF16")


def dp_mm(x: torch.Tensor, w: Int4PackedWeight, threads: int = 2) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    packed, sz = w.amx_operands
    int4_dpbf16_matmul(x.bfloat16().contiguous().view(torch.uint16).numpy(), packed, sz,
                       out.view(torch.uint16).numpy(), threads)
    return out


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n, k", [(64, 32), (192, 576), (960, 576), (576, 1536)])
def test_identity_rows_give_the_expanded_weight_bit_for_bit(fmt, n, k):
    """One-hot rows pick single weights: the kernel's bf16 dequantization must be the expansion's."""
    w = Int4PackedWeight.from_quantized(quantized(fmt, n, k))
    want = w.expand_f32_t().bfloat16()  # [K, N]: exact float32 value rounded to nearest even
    for k0 in range(0, k, 37):  # 37 rows: full register blocks and a ragged last one
        eye = torch.eye(k)[k0:k0 + 37]
        got = dp_mm(eye, w)
        assert torch.equal(got.view(torch.int16), want[k0:k0 + eye.shape[0]].view(torch.int16)), k0


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 31, 33, 100, 300])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_row_count_matches_the_expanded_gemm(m, threads):
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=1))
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
    assert_matches_expanded_gemm(dp_mm(x, w, threads), x, w)


@pytest.mark.parametrize("nxt_n, nxt_k", [(64, 32), (192, 576), (576, 1536), (3072, 576)])
@pytest.mark.parametrize("m, threads", [(1, 2), (32, 1), (32, 2), (33, 3), (100, 2)])
def test_streaming_in_the_next_weight_changes_no_result(nxt_n, nxt_k, m, threads):
    """``int4_dpbf16_matmul_then`` only prefetches the next call's weight (whatever its shape, and
    with fewer panels than threads): its products are ``int4_dpbf16_matmul``'s, bit for bit."""
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=2))
    nxt = Int4PackedWeight.from_quantized(quantized("Q4_0", nxt_n, nxt_k, seed=3))
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16().view(torch.uint16).numpy()
    packed, sz = w.amx_operands
    want = np.empty((m, 960), np.uint16)
    int4_dpbf16_matmul(x, packed, sz, want, threads)
    for then in (True, False):
        got = np.full((m, 960), 0xFFFF, np.uint16)
        int4_dpbf16_matmul_then(x, packed, sz, got, threads, *nxt.amx_operands, then)
        assert np.array_equal(got, want)


def _kv(blocks: int, dtype=np.uint16) -> np.ndarray:
    return np.zeros((2, blocks, 3, 16, 64), dtype)  # [K/V, blocks, kv heads, block size, head dim]


def _lines_of(kv: np.ndarray, runs: np.ndarray) -> list[int]:
    """Every cache line the runs name, as byte offsets, in order."""
    return [int(off) + 64 * i for off, n, _ in runs for i in range(int(n))]


def test_kv_runs_name_each_decodes_blocks_once_merging_neighbours():
    kv = _kv(40)
    tables = np.array([[5, 6, 7, 0], [9, 3, 4, 0], [20, 0, 0, 0]], np.int32)
    lens = np.array([40, 33, 5], np.int32)  # 3 blocks, 3 blocks, 1 block
    runs = kv_runs(kv, lens, tables, 3, 0)
    block, plane = kv.strides[1], kv.strides[0]
    want = [(p * plane + b * block, n) for p in (0, 1) for b, n in ((5, 3), (9, 1), (3, 2), (20, 1))]
    assert [(int(r[0]), int(r[1]) * 64 // block) for r in runs] == want
    assert list(runs[:, 2]) == list(np.cumsum([0] + [int(r[1]) for r in runs[:-1]]))
    assert run_lines(runs) == 2 * 7 * block // 64
    # only the first n sequences, and only the blocks a sliding window still reads
    assert _lines_of(kv, kv_runs(kv, lens, tables, 1, 0)) == _lines_of(kv, runs[[0, 4]])
    windowed = kv_runs(kv, lens, tables, 2, 17)  # keys 23:40 and 16:33: blocks 1-2 of each
    assert [(int(r[0]), int(r[1]) * 64 // block) for r in windowed] == [
        (p * plane + b * block, n) for p in (0, 1) for b, n in ((6, 2), (3, 2))]
    assert run_lines(kv_runs(kv, lens, tables, 0, 0)) == 0


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n, k", [(64, 32), (960, 576), (576, 1536)])
def test_widened_panels_hold_the_expanded_weight_in_pairs(fmt, n, k):
    """``int4_to_bf16_panels`` (``Int4PackedWeight.wide_panels``): panel ``p``'s word ``[i, c]`` holds
    column ``32 p + c``'s bf16 weights at ``k = 2i`` (low half) and ``2i + 1``, as the expansion has them."""
    w = Int4PackedWeight.from_quantized(quantized(fmt, n, k, seed=4))
    wide = int4_to_bf16_panels(*w.amx_operands)
    bits = w.expand_f32_t().bfloat16().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)  # [K, N]
    want = (bits[0::2] | bits[1::2] << 16).reshape(k // 2, n // 32, 32).transpose(1, 0, 2)
    assert wide.shape == (n // 32, k // 2, 32) and np.array_equal(wide, want)
    assert w.wide_panels is w.wide_panels and w.cache_nbytes >= wide.nbytes


@pytest.mark.parametrize("m, threads", [(9, 1), (32, 2), (33, 3)])
@pytest.mark.parametrize("take", [(0, 1), (0.3, 0.9), (0, 0.5), (1, 1)])
@pytest.mark.parametrize("wide", [False, True], ids=["widened-per-call", "widened-before"])
def test_streaming_in_cache_runs_changes_no_result(m, threads, take, wide):
    """Lines ``l0:l1`` of a cache's runs ride along with a decode step's products (any share, ragged
    runs, more lines than a call has pairs for), on panels widened per call or beforehand (streaming
    in the next weight's first panel after the last): the outputs stay ``int4_dpbf16_matmul``'s."""
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=2))
    nxt = Int4PackedWeight.from_quantized(quantized("Q4_0", 576, 1536, seed=3))
    panels, nxt_panels = (w.wide_panels, nxt.wide_panels) if wide else (NO_PANELS, NO_PANELS)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16().view(torch.uint16).numpy()
    packed, sz = w.amx_operands
    want = np.empty((m, 960), np.uint16)
    int4_dpbf16_matmul(x, packed, sz, want, threads)
    kv = _kv(400)
    tables = np.arange(1, 401, dtype=np.int32).reshape(20, 20)[:, ::-1].copy()  # no two neighbours merge
    runs = kv_runs(kv, np.full(20, 317, np.int32), tables, 20, 0)
    lines = run_lines(runs)
    got = np.full((m, 960), 0xFFFF, np.uint16)
    n_panels = 960 // 32
    for w in range(threads):  # each worker's panels with its share of the lines, as the decode step deals them
        l0, l1 = int(take[0] * lines), int(take[1] * lines)
        q0, q1 = w * 18 // threads, (w + 1) * 18 // threads  # its share of the next weight's 18 panels
        _int4_panels(x.view(np.uint32), packed, sz, got, w * n_panels // threads, (w + 1) * n_panels // threads,
                     packed, sz, q0, q1, kv, runs, l0 + w * (l1 - l0) // threads, l0 + (w + 1) * (l1 - l0) // threads,
                     panels, nxt_panels)
    assert np.array_equal(got, want)


@njit
def _walk(kv, runs, counts, pairs):
    """Where ``_dot_block_runs``' prefetch stream stands after calls asking ``counts[i]`` lines each."""
    a = np.zeros(8 * pairs, np.uint32)
    b = np.zeros(32 * pairs, np.uint32)
    c = np.zeros(256, np.float32)
    cur = np.zeros(3, np.int64)
    seen = np.zeros((counts.shape[0], 2), np.int64)
    for i in range(counts.shape[0]):
        cur[2] = counts[i]
        _dot_block_runs(a, 0, pairs, 8, b, 0, 32, 2, pairs, c, b, 0, 0, kv, runs, cur)
        seen[i, 0], seen[i, 1] = cur[0], cur[1]
    return seen


def test_the_cache_stream_walks_its_runs_a_line_a_pair():
    """Each call asks for its count of lines (at most one a pair) and the next goes on from there,
    across run boundaries: the cursor ends where counting the lines says, never past the last run."""
    kv = _kv(64)
    tables = np.array([[3, 4, 10], [30, 31, 32]], np.int32)
    runs = kv_runs(kv, np.array([48, 20], np.int32), tables, 2, 0)  # per plane: blocks 3-4, 10, 30-31
    starts = [int(r[2]) for r in runs]
    counts = np.array([5, 0, 96, 200, 300, 150, 150, 100, 63, 96], np.int64)  # 200 and 300: 150 pairs
    done = np.cumsum(np.minimum(counts, 150))
    assert done[-1] == run_lines(runs)
    for (run, line), n in zip(_walk(kv, runs, counts, 150), done):
        want = max(i for i, s0 in enumerate(starts) if s0 <= n) if n < done[-1] else len(starts)
        assert (run, line) == ((want, n - starts[want]) if n < done[-1] else (len(starts), 0))


def test_the_backend_routes_batched_steps_to_the_kernel(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")  # on an AMX machine too: the AVX512-BF16 path is its fallback
    backend = CPUBackend(threads=2, warmup=False)
    assert backend.capabilities().notes["avx512_bf16_kernels"]
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 192, 576, seed=2))
    calls = []
    monkeypatch.setattr(cpu_backend, "int4_dpbf16_matmul",
                        lambda *a: calls.append(a[0].shape[0]) or int4_dpbf16_matmul(*a))
    low = max(cpu_backend.DPBF16_MIN_ROWS, backend._gemv_rows + 1)  # fewer rows: int4_gemv or ATen's kernel
    for m in (1, low - 1, low, 32, 600):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
        for xs in (x, x.float()):  # the short path (bf16 rows) and the converting one
            y = backend.linear(xs, w)
            assert y.shape == (m, 192) and y.dtype == xs.dtype
            torch.testing.assert_close(y.float(), x.float() @ w.expand_f32_t(), rtol=2e-2, atol=2e-2)
    assert calls == [low, low, 32, 32, 600, 600]


def test_edgellm_dpbf16_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setenv("EDGELLM_DPBF16", "0")
    backend = CPUBackend(threads=2, warmup=False)
    assert not backend.capabilities().notes["avx512_bf16_kernels"]
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 64, 32))
    monkeypatch.setattr(cpu_backend, "int4_dpbf16_matmul", lambda *a: pytest.fail("AVX512-BF16 kernel called"))
    y = backend.linear(torch.randn(40, 32).bfloat16(), w)
    assert y.shape == (40, 64)


@pytest.mark.parametrize("m", [1, 4, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (1024, 64)])
def test_int8_matches_float64(m, n, k):
    x, qw, scale = int8_case(m, n, k)
    out = np.full((m, n), np.nan, np.float32)
    int8_dpbf16_matmul(x.view(torch.uint16).numpy(), qw.numpy(), scale.float().numpy(), out, 2)
    assert_matches_float64(out, x, qw, scale)


@pytest.mark.parametrize("m", [8, 20])
def test_greedy_steps_through_the_int8_kernel_keep_the_exact_argmax(m, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setenv("EDGELLM_VNNI", "0")  # with VNNI, int8_gemv takes these rows
    assert_greedy_head_exact(m, monkeypatch, "int8_dpbf16_matmul")


@pytest.mark.parametrize("m", [cpu_backend.BF16_PANEL_HEAD_MIN_ROWS, 40])
def test_greedy_steps_through_the_widened_head_keep_the_exact_argmax(m, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setenv("EDGELLM_VNNI", "0")  # with VNNI, int8_head_vnni takes these rows
    assert_greedy_head_exact(m, monkeypatch, "bf16_panels_matmul")


@pytest.mark.parametrize("m", [1, 7, 8, 9, 32, 33])
@pytest.mark.parametrize("n, k", [(32, 32), (96, 576), (1024, 64)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_widened_panels_give_the_int8_kernel_bit_for_bit(m, n, k, threads):
    """The head widened once (``int8_to_bf16_panels``) and multiplied (``bf16_panels_matmul``): the same
    products in the same order as ``int8_dpbf16_matmul``, so the same float32 bits, and float64's
    numbers within the sums' rounding."""
    x, qw, scale = int8_case(m, n, k)
    xs, s32 = x.view(torch.uint16).numpy(), scale.float().numpy()
    panels = int8_to_bf16_panels(qw.numpy())
    assert panels.shape == (n // 32, k // 2, 32)
    got = np.full((m, n), np.nan, np.float32)
    bf16_panels_matmul(xs, panels, s32, got, threads)
    want = np.full((m, n), np.nan, np.float32)
    int8_dpbf16_matmul(xs, qw.numpy(), s32, want, threads)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert_matches_float64(got, x, qw, scale)


def test_the_widened_head_is_built_once_on_first_use():
    n, k = 64, 64
    _, qw, _ = int8_case(1, n, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    head = Q8_0Weight.from_quantized(QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k)), head=True).argmax_head
    before = head.nbytes
    panels = head.bf16_panels()
    assert head.bf16_panels() is panels
    assert head.nbytes == before + panels.nbytes == before + 2 * n * k
    # each uint32 holds two of the row's int8 values as bf16: exact
    pairs = torch.from_numpy(panels.view(np.int16).copy()).view(torch.bfloat16).float()  # [n/32, k/2, 32, 2]
    back = pairs.reshape(n // 32, k // 2, 32, 2).permute(0, 2, 1, 3).reshape(n, k)
    assert torch.equal(back, head.qw.float())
