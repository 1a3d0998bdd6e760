"""Warming the CPU backend's kernels: one tiny call of each path a step can take.

A later process only loads the compiled kernels from Numba's on-disk cache (~0.5 s on 2 cores). The
first run on a machine compiles them: ~3 minutes of one core on a 2-core Zen 4, most of it in a few
big kernels (a decode step's layers in one call ~70 s, the decode attention kernels 20-45 s each).
Compiling is single-threaded, so ``warm_up`` starts a helper process that runs the same steps in
reverse order while this one runs them forward: each step first looks in the on-disk cache, so the two
meet in the middle and the wait roughly halves. ``kernels_compiled`` tells the commands in advance, so
they can say why the first start takes minutes.

    python -m edgellm.backends.cpu_warmup    # the helper: the steps in reverse order, then exit
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from edgellm.backends.base import AttentionMetadata, DecoderLayer, DecoderShape
from edgellm.backends.cpu_weights import Int4PackedWeight, Q8_0Weight
from edgellm.quant import QuantizedTensor
from edgellm.quant.kv_int8 import row_elements

if TYPE_CHECKING:
    from edgellm.backends.cpu import CPUBackend

logger = logging.getLogger(__name__)

# set in the helper process, so that its own backend does not start another helper
HELPER_ENV = "EDGELLM_WARMUP_HELPER"


def warm_up(backend: CPUBackend, helper: bool | None = None) -> float:
    """Run every step on ``backend``; with ``helper`` (default: when the kernels are not compiled yet
    and this is not the helper itself) a second process compiles from the other end. Seconds taken."""
    t0 = time.perf_counter()
    if helper is None:  # a helper needs a core of its own to gain anything
        helper = os.environ.get(HELPER_ENV) is None and usable_cpus() > 1 and not kernels_compiled()
    with _helper_process() if helper else contextlib.nullcontext():
        for step in steps(backend):
            step()
    backend._kv_views.clear()
    backend._stacks.clear()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _helper_process() -> Iterator[None]:
    env = {**os.environ, HELPER_ENV: "1"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "edgellm.backends.cpu_warmup"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as e:  # no second process: compile everything here, only slower
        logger.debug("no warm-up helper: %s", e)
        yield
        return
    try:
        yield
    finally:  # whatever it still compiles, this process has done already
        proc.kill()
        proc.wait()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def kernels_compiled() -> bool:
    """Whether Numba's on-disk cache holds this source's kernels compiled for this CPU (checked on
    kernels every CPU's warm-up compiles). False on a first run; True where Numba's internals are not
    what this expects, so that nothing wrong is ever said."""
    from edgellm.kernels.cpu.activations import silu_and_mul
    from edgellm.kernels.cpu.paged_attention import paged_attention_step
    from edgellm.kernels.cpu.q8_0 import q8_0_rows

    try:
        for kernel in (q8_0_rows, silu_and_mul, paged_attention_step):
            magic = kernel.targetctx.codegen().magic_tuple()
            if not any(key[1] == magic for key in kernel._cache._cache_file._load_index()):
                return False
    except Exception:  # noqa: BLE001 - another Numba version's internals
        return True
    return True


def warm_up_cache(backend: CPUBackend, dtype: torch.dtype) -> float:
    """The steps whose kernels depend on the KV cache's dtype, for a cache of ``dtype`` other than the
    default bf16 (an int8 cache's kernels are their own compilations). Seconds taken."""
    t0 = time.perf_counter()
    for step in cache_steps(backend, lambda: _cache(dtype)):
        step()
    backend._kv_views.clear()
    backend._stacks.clear()
    return time.perf_counter() - t0


def steps(b: CPUBackend) -> list[Callable[[], object]]:
    """The warm-up calls, each independent of the others, in the order a process runs them."""
    from edgellm.backends import cpu as c

    def q8_0_and_expanded() -> None:
        w = QuantizedTensor("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), (2, 32))
        b.linear(torch.zeros(1, 32), Q8_0Weight.from_quantized(w))
        b.embedding(torch.zeros(1, dtype=torch.long), w, torch.float32)
        b.embedding(torch.zeros(1, dtype=torch.long), Q8_0Weight.from_quantized(w), torch.float32)
        many = max(c.INT4_KERNEL_MAX_ROWS, c.Q8_0_GEMM_MIN_ROWS, c.AMX_MATMUL_MAX_ROWS) + 1  # big steps' expanded weights
        b.linear(torch.zeros(many, 32), Q8_0Weight.from_quantized(w))
        b.linear(torch.zeros(many, 32), _int4(64, 32))

    def greedy_head() -> None:
        # greedy steps' int8 head with its serial and parallel re-scoring (and the AMX head)
        head = Q8_0Weight.from_quantized(QuantizedTensor("Q8_0", torch.zeros(32, 68, dtype=torch.uint8), (32, 64)),
                                         head=True)  # k = 64: the AMX-INT8 head's tiles take it
        for rows in (1, c.AMX_HEAD_MIN_ROWS, c.INT8_GEMV_MAX_ROWS):
            b.logits(torch.zeros(rows, 64), head, argmax_cols=32)

    def int4_kernels() -> None:
        w4 = _int4(64, 32)
        lo, hi = b._batched_rows
        for rows in {lo, b._gemv_rows + 1}:  # int4_gemv, then the AMX / dpbf16 kernel
            if lo <= rows <= hi:
                b.linear(torch.zeros(rows, 32, dtype=torch.bfloat16), w4)
        if b._gemv_rows:  # a decode's fused norm + projection (float32 input at the first layer) and MLP
            for dt in (torch.float32, torch.bfloat16):
                b.norm_linear(torch.zeros(1, 32, dtype=dt), torch.ones(32), 1e-6, None, w4, None, torch.bfloat16)
            b.act_linear(torch.zeros(1, 64, dtype=torch.bfloat16), "silu", w4)

    def norms_and_activations() -> None:
        # packed models run bf16 activations: norms in and out of bf16, and the gated MLP
        norm_w = torch.ones(32)
        for rows in (1, c.ROW_PARALLEL_MIN_ROWS):  # a decode on the calling thread, a prompt's rows split
            x, res = b.rms_norm(torch.zeros(rows, 32), norm_w, 1e-6, None, torch.bfloat16)
            x, res = b.rms_norm(x, norm_w, 1e-6, res, torch.bfloat16)
            b.rms_norm(x, norm_w, 1e-6, res, torch.float32)
        for rows in (1, c.PARALLEL_MIN_ROWS):
            b.act_and_mul(torch.zeros(rows, 64, dtype=torch.bfloat16))

    def separate_attention() -> None:
        # rotary and attention on strided views of the qkv projection: a prompt row (flash attention)
        # and a decode row (the Numba kernel)
        q, k, v = (t.view(1, 1, 32) for t in torch.zeros(1, 96, dtype=torch.bfloat16).split(32, dim=-1))
        q, k = b.rotary(q, k, torch.zeros(1, dtype=torch.long), torch.zeros(1, 32))
        kv, x = torch.zeros(2, 1, 1, 1, 32), torch.zeros(1, 1, 32)
        for decodes in (0, 1):
            meta = _meta(1, 1, decodes, block_size=1)
            b.attention(x, x, x, kv, meta, 1.0)
            b.attention(q, k, v, kv, meta, 1.0)

    return [q8_0_and_expanded, greedy_head, int4_kernels, norms_and_activations, separate_attention,
            *cache_steps(b, lambda: _cache(torch.bfloat16))]


def cache_steps(b: CPUBackend, cache: Callable[[], torch.Tensor]) -> list[Callable[[], object]]:
    """The warm-up calls on a model's KV cache (head size 64, ``cache()`` a fresh one-block cache)."""
    from edgellm.backends import cpu as c

    def fused_decode_attention() -> None:
        # a decode step's fused rotary + attention: on AMX tiles where the CPU has them
        b.rope_attention(torch.zeros(1, 192, dtype=torch.bfloat16), 1, 1, 64, torch.zeros(1, dtype=torch.long),
                         torch.zeros(1, 64), cache(), _meta(1, 1, 1, block_size=1), 1.0)

    def prompt_attention() -> None:
        # prompt chunks': rotary on the calling thread (a short chunk) or split among threads, then the
        # AMX or AVX512-BF16 prompt kernel where the CPU has one, else bf16 flash attention
        for n in (1, c.ROW_PARALLEL_MIN_ROWS):
            b.rope_attention(torch.zeros(n, 192, dtype=torch.bfloat16), 1, 1, 64, torch.arange(n),
                             torch.zeros(n, 64), cache(), _meta(n, n, 0), 1.0)

    def decoder_layers() -> None:
        # a one-row decode step through decoder_layers' one-call path: head size 64, hidden size 64, two
        # layers, so that building the typed list of layers appends one too
        layers = [DecoderLayer(torch.ones(64), _int4(192, 64), None, _int4(64, 64), torch.ones(64), _int4(128, 64),
                               _int4(64, 64), torch.bfloat16, torch.bfloat16) for _ in range(2)]
        b.decoder_layers(torch.zeros(1, 64), layers, DecoderShape(1, 1, 64, 1e-6, 1.0), [cache(), cache()],
                         torch.zeros(1, dtype=torch.long), torch.zeros(1, 64), _meta(1, 1, 1))

    return [fused_decode_attention, prompt_attention, decoder_layers]


def _int4(n: int, k: int) -> Int4PackedWeight:
    return Int4PackedWeight.from_quantized(QuantizedTensor("Q4_1", torch.zeros(n, k // 32 * 20, dtype=torch.uint8),
                                                           (n, k)))


def _cache(dtype: torch.dtype) -> torch.Tensor:
    """A one-block cache of head size 64 (an int8 one's rows carry their scale, ``quant.kv_int8``)."""
    return torch.zeros(2, 1, 1, 16, row_elements(64, dtype), dtype=dtype)


def _meta(queries: int, seq_len: int, decodes: int, block_size: int = 16) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.arange(queries), query_start_loc=torch.tensor([0, queries], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        block_size=block_size, max_query_len=queries, max_seq_len=seq_len, num_decode_tokens=decodes,
        query_start_loc_list=[0, queries], seq_lens_list=[seq_len])


def _helper_main() -> None:
    """The helper: this CPU backend's steps, last first; the parent kills it when it is done."""
    from edgellm.backends.cpu import CPUBackend

    backend = CPUBackend(warmup=False)
    for step in reversed(steps(backend)):
        step()


if __name__ == "__main__":
    _helper_main()
