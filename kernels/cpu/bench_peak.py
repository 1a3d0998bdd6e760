"""The CPU's arithmetic peaks, the roofline the kernels are measured against (``bench_kernels peak``).

Each peak is one instruction issued back to back into 16 independent accumulators in registers (no
loads, no dependencies a core has to wait on), on one thread and on every Numba thread: what the
cores can do at best, as the kernels would see it. Counted as the kernels count their work: an fp32
FMA lane is 2 operations, ``vdpbf16ps`` 2 bf16 products and their sums a lane (64 a zmm), ``vpdpbusd``
4 byte products and their sums a lane (128 a zmm). A kernel's GFLOP/s over the peak of its
instruction is its efficiency: the int4 matmul at 512 rows, say, against ``vdpbf16ps``.
"""
from __future__ import annotations

import time

import numba
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgellm.kernels.cpu.amx import _BFloat
from edgellm.kernels.cpu.isa import has

ACCUMULATORS = 16
UNROLL = 4  # instructions an accumulator per loop trip
# the instructions: (LLVM intrinsic, accumulator lanes, accumulator element, operand type, ops an instruction)
KINDS = {
    "fma32_ymm": ("llvm.fma.v8f32", 8, "float", "float", 16),  # AVX2 laptops' fp32 peak
    "fma32": ("llvm.fma.v16f32", 16, "float", "float", 32),
    "dpbf16": ("llvm.x86.avx512bf16.dpbf16ps.512", 16, "float", "bf16", 64),
    "vpdpbusd": ("llvm.x86.avx512.vpdpbusd.512", 16, "int", "int", 128),
}


def available() -> list[str]:
    """The instructions this CPU (Numba's target) has, of ``KINDS``: AVX2's 8-lane FMA on any x86 CPU
    of the last decade, the rest with AVX-512."""
    out = []
    if has("avx2", "fma"):
        out.append("fma32_ymm")
    if has("avx512f"):
        out.append("fma32")
    if has("avx512bf16", "avx512f", "avx512bw"):
        out.append("dpbf16")
    if has("avx512vnni", "avx512bw"):
        out.append("vpdpbusd")
    return out


@intrinsic(prefer_literal=True)
def _burn(typingctx, trips, seed, kind):
    """``trips`` x ``UNROLL`` x ``ACCUMULATORS`` instructions of ``KINDS[kind]``; returns a lane of their
    sum, so that nothing is optimised away."""
    if not (isinstance(kind, types.StringLiteral) and kind.literal_value in KINDS):
        return None
    name, lanes, elem, operand, _ = KINDS[kind.literal_value]

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        scalar = ir.FloatType() if elem == "float" else i32
        acc_t = ir.VectorType(scalar, lanes)
        op_t = {"float": acc_t, "int": acc_t, "bf16": ir.VectorType(_BFloat(), 2 * lanes)}[operand]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_t, [acc_t, op_t, op_t]), name)
        value = builder.sitofp(args[1], scalar) if elem == "float" else builder.trunc(args[1], i32)
        seed_v = builder.insert_element(ir.Constant(acc_t, None), value, ir.Constant(i32, 0))
        a = builder.bitcast(seed_v, op_t)
        b = builder.bitcast(builder.add(seed_v, seed_v) if elem == "int" else builder.fadd(seed_v, seed_v), op_t)
        entry = builder.block
        loop, done = builder.append_basic_block("burn"), builder.append_basic_block("burnt")
        builder.branch(loop)
        builder.position_at_end(loop)
        trip = builder.phi(i64)
        trip.add_incoming(ir.Constant(i64, 0), entry)
        accs = []
        for j in range(ACCUMULATORS):
            acc = builder.phi(acc_t)
            start = ir.Constant(acc_t, [float(j) if elem == "float" else j] * lanes)
            acc.add_incoming(start, entry)
            accs.append(acc)
        cur = list(accs)
        for _ in range(UNROLL):  # acc + a b: ``llvm.fma`` takes the addend last, the dot products first
            cur = [builder.call(fn, [a, b, c] if operand == "float" else [c, a, b]) for c in cur]
        nxt = builder.add(trip, ir.Constant(i64, 1))
        trip.add_incoming(nxt, builder.block)
        for acc, c in zip(accs, cur):
            acc.add_incoming(c, builder.block)
        builder.cbranch(builder.icmp_signed("<", nxt, context.cast(builder, args[0], sig.args[0], types.int64)),
                        loop, done)
        builder.position_at_end(done)
        total = cur[0]
        for c in cur[1:]:
            total = builder.fadd(total, c) if elem == "float" else builder.add(total, c)
        lane = builder.extract_element(total, ir.Constant(i32, 0))
        return lane if elem == "float" else builder.sitofp(lane, ir.FloatType())

    return types.float32(trips, seed, kind), codegen


@njit(cache=True)
def _one(trips, kind):
    return _burn(trips, 1, literally(kind))


@njit(cache=True, parallel=True)
def _every(trips, workers, kind):
    total = 0.0
    for w in prange(workers):
        total += _burn(trips, w + 1, literally(kind))
    return total


def peak_gops(kind: str, threads: int, seconds: float = 0.25) -> float:
    """``kind``'s peak on ``threads`` threads (1: this one), in G operations a second."""
    ops = KINDS[kind][4] * UNROLL * ACCUMULATORS

    def run(trips: int) -> float:
        t = time.perf_counter()
        if threads == 1:
            _one(trips, kind)
        else:
            _every(trips, threads, kind)
        return time.perf_counter() - t

    run(8)  # compile
    trips = 1 << 14
    while (dt := run(trips)) < seconds / 4:
        trips *= 4
    best = min([dt] + [run(trips) for _ in range(2)])
    return ops * trips * threads / best / 1e9


def bench_peak(backend) -> list[str]:
    names = available()
    if not names:
        return ["peak: this CPU has neither AVX2 with FMA nor AVX-512 (the peaks are measured on their instructions)"]
    threads = max(1, min(backend.threads, numba.get_num_threads()))
    lines = []
    for kind in names:
        one, every = peak_gops(kind, 1), peak_gops(kind, threads)
        lines.append(f"peak {kind:<10s}| 1 thread {one:7.1f} G ops/s | {threads} threads {every:7.1f} G ops/s "
                     f"({KINDS[kind][4]} ops an instruction)")
    return lines
