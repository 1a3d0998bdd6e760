"""Micro-benchmarks of the CPU kernels against the ATen paths they replace (not a test).

Run ``python -m edgellm.kernels.cpu.bench_kernels [overhead|attention|linear|head|sampled|step|amx|peak]`` (every section
without an argument). Times are the best of several runs, because a
shared machine's other processes only ever make a run slower. GB/s is weight (or KV) bytes read per
second: the number that bounds decode.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numba
import numpy as np
import torch
import torch.nn.functional as F

from edgellm.backends.base import AttentionMetadata
from edgellm.backends.cpu import CPUBackend, Int4PackedWeight, Q8_0Weight
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.bench_amx import bench_amx
from edgellm.kernels.cpu.bench_peak import bench_peak
from edgellm.kernels.cpu.bench_step import bench_step
from edgellm.kernels.cpu.dpbf16 import bf16_panels_matmul, int8_to_bf16_panels
from edgellm.kernels.cpu.dpbf16 import supported as dpbf16_supported
from edgellm.kernels.cpu.int4_gemv import quantize_groups_int16_f32
from edgellm.kernels.cpu.int8_gemv import int8_gemv, quantize_rows_int16, xq_limit
from edgellm.kernels.cpu.int8_gemv import supported as vnni_supported
from edgellm.kernels.cpu.int8_head_vnni import int8_head_vnni, quantize_groups, vnni_panels
from edgellm.kernels.cpu.paged_attention import DEFAULT_Q_TILE, paged_attention_step
from edgellm.kernels.cpu.q8_0 import q8_0_matmul
from edgellm.kernels.cpu.q8_0_gemv import q8_0_gemv
from edgellm.kernels.cpu.q8_0_gemv import supports as q8_0_gemv_supports
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows
from edgellm.quant.kv_int8 import quantize_kv_rows

SMOL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K in, N out)
ONE_B_SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048)]
ROWS = [1, 8, 32, 128, 512, 1024, 2048]
VOCAB_SIZED = 32768  # output features from which a weight is benchmarked as an output head too


def best_seconds(fn: Callable[[], object], budget_s: float = 0.25, min_runs: int = 3) -> float:
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_runs or spent < budget_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


def linear_candidates(backend: CPUBackend, k: int, n: int) -> dict[str, tuple[Callable, int]]:
    """name -> (fn(x fp32) -> y, weight bytes read per call)."""
    w = torch.randn(n, k) * 0.02
    q8 = QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k))
    q4 = QuantizedTensor("Q4_0", quantize_rows("Q4_0", w), (n, k))
    w32, w16 = q8.dequantize(), q8.dequantize(torch.bfloat16)
    p8: Q8_0Weight = backend.prepare_weight(q8, torch.float32)
    p4: Int4PackedWeight = backend.prepare_weight(q4, torch.float32)
    scales = w.abs().amax(1).clamp_min(1e-8) / 127
    wq = torch.quantize_per_channel(w, scales.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    dyn = torch.ops.quantized.linear_prepack(wq, None)

    def int4_kernel(x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p4.packed, 32, p4.scale_zeros)

    cands = {
        "fp32 F.linear (dense)": (lambda x: F.linear(x, w32), w32.numel() * 4),
        "bf16 F.linear (dense)": (lambda x: F.linear(x.bfloat16(), w16), w16.numel() * 2),
        "int8 dynamic": (lambda x: torch.ops.quantized.linear_dynamic(x, dyn), n * k + n * 8),
        "Q4 int4 kernel": (int4_kernel, p4.nbytes),
        "Q4 bf16 expand+GEMM": (lambda x: torch.mm(x.bfloat16(), p4.expand_bf16_t()), p4.nbytes),
        "Q4 edgellm": (lambda x: backend.linear(x, p4), p4.nbytes),
        "Q8_0 numba": (lambda x: backend.linear(x, p8), p8.nbytes),
    }
    if backend._batched_rows[0] <= backend._batched_rows[1] and p4.expandable:  # AMX tiles or AVX512-BF16
        cands["Q4 batched"] = (lambda x: backend._int4_batched_linear(x.bfloat16(), p4), p4.nbytes)
    if n >= VOCAB_SIZED:  # an output head: greedy steps take its int8 copy and re-score (CPUBackend.greedy_tokens)
        head = backend.prepare_weight(q8, torch.float32, "lm_head")
        cands["Q8_0 head, greedy step"] = (lambda x: backend.greedy_tokens(x, head, n), n * k)
    return cands


def bench_linear(backend: CPUBackend) -> list[str]:
    lines = []
    for label, shapes in (("SmolLM-135M", SMOL_SHAPES), ("1B-class", ONE_B_SHAPES)):
        for k, n in shapes:
            cands = linear_candidates(backend, k, n)
            for m in ROWS:
                x = torch.randn(m, k)
                cells = []
                for name, (fn, nbytes) in cands.items():
                    if name in ("Q4 bf16 expand+GEMM", "Q4 batched") and n % 64:
                        continue
                    dt = best_seconds(lambda fn=fn, x=x: fn(x))
                    cells.append(f"{name} {dt * 1e6:8.0f}us {nbytes / dt / 1e9:5.1f}GB/s")
                lines.append(f"{label:11s} {k:5d}->{n:<5d} M={m:<3d} | " + " | ".join(cells))
    return lines


def attention_batch(n_seqs: int, ctx: int, new: int, kv_dtype: torch.dtype, n_heads: int = 9, n_kv: int = 3,
                    head_dim: int = 64, block_size: int = 16):
    """``n_seqs`` sequences of ``ctx`` tokens, the last ``new`` of them this step's, over shuffled blocks."""
    per_seq = (ctx + block_size - 1) // block_size
    n_blocks = n_seqs * per_seq
    kv = torch.randn(2, n_blocks, n_kv, block_size, head_dim)
    kv = quantize_kv_rows(kv) if kv_dtype == torch.int8 else kv.to(kv_dtype)
    tables = torch.randperm(n_blocks).to(torch.int32).reshape(n_seqs, per_seq)
    pos = torch.arange(ctx - new, ctx)
    slots = (tables[:, pos // block_size].long() * block_size + pos % block_size).reshape(-1)
    starts = [i * new for i in range(n_seqs + 1)]
    meta = AttentionMetadata(slots, torch.tensor(starts, dtype=torch.int32),
                             torch.full((n_seqs,), ctx, dtype=torch.int32), tables, block_size, new, ctx,
                             num_decode_tokens=n_seqs if new == 1 else 0, query_start_loc_list=starts,
                             seq_lens_list=[ctx] * n_seqs)
    t = n_seqs * new
    return (torch.randn(t, n_heads, head_dim), torch.randn(t, n_kv, head_dim), torch.randn(t, n_kv, head_dim),
            kv, meta)


def cold_decode_seconds(backend: CPUBackend, n_seqs: int, ctx: int, kv_dtype: torch.dtype, layers: int = 30) -> float:
    """A decode's attention as a model's step meets it: ``layers`` caches attended in turn, so each is
    read from memory, not from the cache the call before left warm. Seconds a layer."""
    batches = [attention_batch(n_seqs, ctx, 1, kv_dtype) for _ in range(layers)]

    def step() -> None:
        for batch in batches:
            backend.attention(*batch, 0.125)

    return best_seconds(step, budget_s=0.5, min_runs=3) / layers


def bench_attention(backend: CPUBackend) -> list[str]:
    ref = TorchBackend()
    lines = []
    invariant = CPUBackend(threads=backend.threads, warmup=False, batch_invariant=True)
    # decodes; one 512-token prompt; a batch of 32 chat-length prompts (prefill steps of a serving burst)
    cases = [(b, c, 1) for b in (1, 8, 32) for c in (512, 1024)] + [(1, 512, 512), (32, 192, 192)]
    for n_seqs, ctx, new in cases:
        cells = []
        for kv_dtype in (torch.float32, torch.bfloat16, torch.int8):
            for name, be in (("default", backend), ("invariant", invariant)):
                if new == 1 and name == "invariant":
                    continue  # decodes take the same Numba kernel in both modes
                batch = attention_batch(n_seqs, ctx, new, kv_dtype)
                kv = batch[3]
                dt = best_seconds(lambda batch=batch, be=be: be.attention(*batch, 0.125))
                kv_bytes = n_seqs * ctx * kv.shape[2] * kv.shape[4] * 2 * kv.element_size()
                cells.append(f"{name} {str(kv_dtype)[6:]:8s} {dt * 1e6:8.0f}us {kv_bytes / dt / 1e9:5.1f}GB/s")
        if new == 1:
            for kv_dtype in (torch.bfloat16, torch.int8):
                kv = attention_batch(1, 16, 1, kv_dtype)[3]
                kv_bytes = n_seqs * ctx * kv.shape[2] * kv.shape[4] * 2 * kv.element_size()
                dt = cold_decode_seconds(backend, n_seqs, ctx, kv_dtype)
                cells.append(f"cold {str(kv_dtype)[6:]} {dt * 1e6:8.0f}us {kv_bytes / dt / 1e9:5.1f}GB/s")
        dt = best_seconds(lambda batch=batch: ref.attention(*batch, 0.125), budget_s=0.1, min_runs=1)
        cells.append(f"torch reference (bf16 KV) {dt * 1e6:8.0f}us")
        kind = "prefill" if new > 1 else "decode"
        lines.append(f"attention {kind:7s} B={n_seqs:<2d} ctx={ctx:<4d} | " + " | ".join(cells))
    return lines


def bench_call_overhead(backend: CPUBackend) -> list[str]:
    """One layer's 1-token decode over a 1-token context: what remains is the per-call cost."""
    q, k, v, kv, meta = attention_batch(1, 1, 1, torch.float32)
    dt = best_seconds(lambda: backend.attention(q, k, v, kv, meta, 0.125), budget_s=0.2, min_runs=200)
    out = q.numpy().copy()
    args = (out, q.numpy(), k.numpy(), v.numpy(), kv.numpy(), meta.slot_mapping.numpy(),
            meta.query_start_loc.numpy(), meta.seq_lens.numpy(), meta.block_tables.numpy(), 0.125, 0, 0.0,
            DEFAULT_Q_TILE)
    raw1 = best_seconds(lambda: paged_attention_step(*args, 1), budget_s=0.2, min_runs=200)
    raw2 = best_seconds(lambda: paged_attention_step(*args, 2), budget_s=0.2, min_runs=200)
    return [(f"attention call overhead (1-token decode): backend.attention {dt * 1e6:.1f}us | "
             f"kernel serial {raw1 * 1e6:.1f}us | kernel via thread pool {raw2 * 1e6:.1f}us")]


def _cold_head_seconds(fn: Callable[[int], object]) -> float:
    """Best time of ``fn(i)`` over three heads in turn, so each call reads its head from memory."""
    turn = [0]

    def call() -> None:
        turn[0] += 1
        fn(turn[0] % 3)

    return best_seconds(call, budget_s=0.3, min_runs=6)


def _head_cells(threads: int, x: torch.Tensor, heads: list, panels: list, wide: list, scale: np.ndarray) -> list[str]:
    m, k = x.shape
    x32, xb = x.numpy(), x.bfloat16().view(torch.uint16).numpy()
    out = np.empty((m, heads[0].shape[0]), np.float32)

    def int16(i: int) -> None:
        xq, s = quantize_rows_int16(x32, xq_limit(k))
        int8_gemv(xq, s, heads[i], scale, out, threads)

    def byte(i: int) -> None:
        xq, s, off, _ = quantize_groups(x32)
        int8_head_vnni(xq, s, off, panels[i], scale, out, threads)

    cells = [f"int8_gemv (int16 x) {_cold_head_seconds(int16) * 1e3:6.2f}ms",
             f"int8_head_vnni (bytes) {_cold_head_seconds(byte) * 1e3:6.2f}ms"]
    if wide:
        dt = _cold_head_seconds(lambda i: bf16_panels_matmul(xb, wide[i], scale, out, threads))
        cells.append(f"bf16 panels {dt * 1e3:6.2f}ms")
    return cells


def bench_head(backend: CPUBackend, n: int = 49152, k: int = 576) -> list[str]:
    """The greedy head's int8 kernels without their re-scoring, cold: ``int8_gemv`` (int16
    activations), ``int8_head_vnni`` (bytes) and, with AVX512-BF16, the bf16-widened panels."""
    if not vnni_supported():
        return ["head kernels: this CPU has no AVX512-VNNI"]
    g = torch.Generator().manual_seed(0)
    heads = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).numpy() for _ in range(3)]
    scale = (torch.rand(n, generator=g) * 0.01).numpy()
    panels = [vnni_panels(qw) for qw in heads]
    wide = [int8_to_bf16_panels(qw) for qw in heads] if dpbf16_supported() else []
    return [f"greedy head {k}->{n} M={m:<3d} (cold) | "
            + " | ".join(_head_cells(backend.threads, torch.randn(m, k, generator=g), heads, panels, wide, scale))
            for m in (1, 4, 8, 16, 32, 64)]


def _sampled_cells(threads: int, x: np.ndarray, weights: list, panels: list) -> tuple[float, float]:
    out = np.empty((x.shape[0], weights[0].shape[0]), np.float32)

    def int16(i: int) -> None:
        xq, xs, _ = quantize_groups_int16_f32(x)
        q8_0_gemv(xq, xs, *panels[i], out, threads)

    return (_cold_head_seconds(int16),
            _cold_head_seconds(lambda i: q8_0_matmul(x, weights[i].qs, weights[i].d, out, threads)))


def bench_sampled_head(backend: CPUBackend, n: int = 49152, k: int = 576) -> list[str]:
    """A sampled step's full logits from a Q8_0 head, cold: ``q8_0_gemv`` (int16 activation groups,
    16-column panels) against the float32 ``q8_0_matmul`` it replaced (below 32 rows; from 32 the
    float32 path was ATen's GEMM on dequantized tiles, slower still here)."""
    if not q8_0_gemv_supports(k):
        return ["sampled head: this CPU has no AVX512-VNNI"]
    g = torch.Generator().manual_seed(1)
    weights = [Q8_0Weight.from_quantized(QuantizedTensor("Q8_0", quantize_rows(
        "Q8_0", torch.randn(n, k, generator=g) * 0.05), (n, k))) for _ in range(3)]
    panels = [w.gemv_panels() for w in weights]
    lines = []
    for m in (1, 4, 8, 32, 64):
        new, old = _sampled_cells(backend.threads, torch.randn(m, k, generator=g).numpy(), weights, panels)
        lines.append(f"sampled head {k}->{n} M={m:<3d} (cold) | q8_0_gemv (int16 x) {new * 1e3:6.2f}ms | "
                     f"q8_0_matmul (float32) {old * 1e3:6.2f}ms | {old / new:4.1f}x")
    return lines


SECTIONS = {"overhead": bench_call_overhead, "attention": bench_attention, "linear": bench_linear, "head": bench_head,
            "sampled": bench_sampled_head, "step": bench_step, "amx": bench_amx, "peak": bench_peak}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgellm.kernels.cpu.bench_kernels",
                                     description="Micro-benchmarks of the CPU kernels (not a test).")
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"any of: {', '.join(SECTIONS)} (none: all of them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        names = parser.parse_args(argv).sections
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            parser.error(f"unknown section: {', '.join(unknown)}")
    except SystemExit as done:  # --help, or a bad argument: argparse has said why
        return int(done.code or 0)
    backend = CPUBackend(batch_invariant=False)
    print(f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()} "
          f"({numba.threading_layer()}); isa {torch.backends.cpu.get_cpu_capability()}")
    for name in names or list(SECTIONS):
        for line in SECTIONS[name](backend):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
