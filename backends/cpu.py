"""The CPU backend: packed int4 weights, Numba kernels, and oneDNN for the big steps.

- Linear: a few rows (up to 8-9; 16 on AVX2) meet the int4 nibbles as integers with int16 activations
  on AVX512-VNNI or AVX2 (``kernels/cpu/int4_gemv.py``, reading a block-by-block copy of the
  scale-zeros, ``Int4PackedWeight.gemv_operands``), or else go through ATen's int4 kernel. On CPUs with
  AMX, steps of 10-256 rows widen each int4 weight once onto AMX tiles (``kernels/cpu/int4_amx.py``,
  ATen's int4 layout read in place); without AMX but with AVX512-BF16 (Zen 4), bigger steps widen
  it once into registers' bf16 pairs for ``vdpbf16ps`` (``kernels/cpu/dpbf16.py``). Other big steps expand each
  weight to bf16 in a scratch buffer (``kernels/cpu/bf16_expand.py``) for one oneDNN GEMM.
- Attention: decodes read K/V in place through block tables (``kernels/cpu/paged_attention.py``);
  prompt chunks (bf16 cache, no sliding window) go through ``kernels/cpu/prompt_attention_amx.py`` on
  AMX CPUs or ``kernels/cpu/prompt_attention_dp.py`` on AVX512-BF16 ones, else torch's flash attention.
- Q8_0 weights (head, embedding) stay int8 and go through Numba kernels (``kernels/cpu/q8_0.py``);
  greedy steps take the head's int8 copy first (``int8_gemv``, ``int8_head_amx`` on AMX-INT8 tiles)
  and recompute exactly only the entries that could be the argmax.
- Activations between packed linears are bf16, the int4 kernel's own input and output: the norms
  write bf16, and rotary, SiLU-and-mul and attention read the projections' bf16 output directly
  (one rounding per value, as converting at the edges would give). The residual stream stays float32.
- Decode steps run the whole layer stack in one Numba call (``decoder_layers``,
  ``kernels/cpu/decode_layers.py``): up to 8 rows on ``int4_gemv``, more on AVX512-BF16 CPUs on the
  batched kernels; on AMX CPUs up to 9 rows on ``int4_gemv`` and up to 256 on tiles
  (``kernels/cpu/decode_layers_amx.py``). The same kernels and numbers as the ops one by one, without ~10 us of Python and
  dispatch around each of 150-210 calls a step (``EDGELLM_FUSED_LAYERS=0`` turns it off). On
  AVX512-BF16 and AMX CPUs a step of decodes only stays inside one parallel region
  (``kernels/cpu/decode_step_spin.py``): its workers go through the kernels as phases with spin
  waits between them, instead of entering a region for each kernel (eight a layer).
- ``batch_invariant`` mode (or a step holding a seeded request) keeps the arithmetic of every token
  independent of its batch: int4 kernel for generated tokens, exact fp32 tiles for prompt tokens,
  Numba attention for all.

Kernels are compiled with ``cache=True`` and warmed at init (``backends/cpu_warmup.py``; on a first
run with a helper process compiling from the other end), so a later process only loads them.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numba
import numpy as np
import psutil
import torch
import torch.nn.functional as F

from edgellm.backends.base import AttentionMetadata, Capabilities, DecoderLayer, DecoderShape
from edgellm.backends.cpu_memory import populate
from edgellm.backends.cpu_warmup import usable_cpus, warm_up, warm_up_cache
from edgellm.backends.cpu_weights import Int4PackedWeight, Q8_0Weight
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.activations import PARALLEL_MIN_ROWS, silu_and_mul, silu_and_mul_parallel
from edgellm.kernels.cpu.amx import amx_int8_supported, request_amx
from edgellm.kernels.cpu.amx import make_config as make_tile_config
from edgellm.kernels.cpu.attention_amx import paged_attention_step_amx, rope_attention_step_amx
from edgellm.kernels.cpu.attention_amx import supports as amx_attention_supports
from edgellm.kernels.cpu.attention_dpbf16 import paged_attention_step_dp, rope_attention_step_dp
from edgellm.kernels.cpu.attention_dpbf16 import supports as dp_attention_supports
from edgellm.kernels.cpu.decode_layers import decode_layers, decode_layers_dp, layer_list
from edgellm.kernels.cpu.decode_layers_amx import decode_layers_amx
from edgellm.kernels.cpu.dpbf16 import NO_PANELS, bf16_panels_matmul, int4_dpbf16_matmul, int8_dpbf16_matmul
from edgellm.kernels.cpu.dpbf16 import supported as dpbf16_supported
from edgellm.kernels.cpu.head_screen import COLS as SCREEN_COLS
from edgellm.kernels.cpu.int4_amx import int4_amx_matmul
from edgellm.kernels.cpu.int4_gemv import int4_gemv, norm_int4_gemv, quantize_groups_int16_f32, silu_int4_gemv
from edgellm.kernels.cpu.int4_gemv import isa as int4_gemv_isa
from edgellm.kernels.cpu.int8_amx import int8_amx_matmul
from edgellm.kernels.cpu.int8_gemv import int8_gemv, quantize_rows_int16, xq_limit
from edgellm.kernels.cpu.int8_gemv import runs as int8_gemv_runs
from edgellm.kernels.cpu.int8_gemv import supported as vnni_supported
from edgellm.kernels.cpu.int8_head_amx import SCREEN_COLS as AMX_SCREEN_COLS
from edgellm.kernels.cpu.int8_head_amx import int8_head_amx
from edgellm.kernels.cpu.int8_head_amx import screen_arrays as amx_head_screen
from edgellm.kernels.cpu.int8_head_amx import screen_bounds as amx_screen_bounds
from edgellm.kernels.cpu.int8_head_amx import supports as int8_head_supports
from edgellm.kernels.cpu.int8_head_vnni import int8_head_vnni, quantize_groups
from edgellm.kernels.cpu.int8_head_vnni import supports as vnni_head_supports
from edgellm.kernels.cpu.norm_rope import (
    add_rms_norm,
    add_rms_norm_parallel,
    rope_neox,
    rope_neox_parallel,
    rope_neox_qk,
    rope_neox_qk_parallel,
)
from edgellm.kernels.cpu.paged_attention import (
    DEFAULT_Q_TILE,
    paged_attention_step,
    rope_attention_step,
    write_kv,
    write_kv_parallel,
)
from edgellm.kernels.cpu.prompt_attention_amx import prompt_attention_amx
from edgellm.kernels.cpu.prompt_attention_amx import supports as prompt_amx_supports
from edgellm.kernels.cpu.prompt_attention_dp import prompt_attention_dp
from edgellm.kernels.cpu.prompt_attention_dp import supports as prompt_dp_supports
from edgellm.kernels.cpu.q8_0 import (
    q8_0_dequantize,
    q8_0_matmul,
    q8_0_rescore,
    q8_0_rescore_screened,
    q8_0_rows,
    q8_0_rows_raw,
    row_norms,
)
from edgellm.kernels.cpu.q8_0_gemv import q8_0_gemv
from edgellm.kernels.cpu.q8_0_gemv import supports as q8_0_gemv_supports
from edgellm.quant import QuantizedTensor
from edgellm.quant.kv_int8 import dequantize_kv_rows, quantize_kv_rows

logger = logging.getLogger(__name__)

# Below this many (query row x key) pairs a step's attention runs on the calling thread: waking the
# pool costs a few microseconds idle and a whole time slice when another process holds a core.
SERIAL_ATTENTION_WORK = 1024  # below this, waking the second thread costs more than it saves
# Norms, rotary and cache writes of this many rows split them among the threads (a prompt chunk, a
# big batch); fewer rows run on the calling thread. Rows are independent: the numbers do not change.
ROW_PARALLEL_MIN_ROWS = 16
# ATen's int4 kernel costs ~linear time per row; past this many rows expanding the weight to bf16
# and one oneDNN GEMM (AMX / AVX512-BF16) is cheaper (bench_kernels.py).
INT4_KERNEL_MAX_ROWS = 32
# On CPUs with AMX, linears of AMX_MIN_ROWS..AMX_MAX_ROWS rows widen each int4 weight once per call
# onto AMX tiles instead (kernels/cpu/int4_amx.py): at 576x3072, 4.8x ATen's kernel at 32 rows and 2x
# the expansion + GEMM at 64-128 rows. One decode stream keeps ATen's kernel (2.2x faster at one row).
# Decode steps of up to AMX_MAX_ROWS rows run their layers in one call (``decode_layers``), as do steps
# with prompt rows whose every linear stays on the tiles (``_tiles_take``); greedy steps up to it take
# the AMX int8 head.
AMX_MIN_ROWS = 10
AMX_MAX_ROWS = 256
# Past AMX_MAX_ROWS, up to AMX_MATMUL_MAX_ROWS, the tiles keep a linear while its activations fit in
# L2 (rows x K <= AMX_MATMUL_MAX_ELEMENTS bf16, 2 MiB): the kernel reads them again for every panel of
# 32 output columns. SmolLM2's four linears together: 1.73x the expansion + oneDNN GEMM at 256 rows,
# 1.17-1.23x at 512-768, 1.07x at 1024, 0.74x at 1536; a 1B model's (K = 2048) 1.2-1.3x at 512 rows
# but 0.4-0.8x at 1024 (BENCHMARKS.md, round 35), where oneDNN's blocked GEMM takes over.
AMX_MATMUL_MAX_ROWS = 1024
AMX_MATMUL_MAX_ELEMENTS = 1 << 20
# Greedy steps from this many rows take the int8 head on AMX (kernels/cpu/int8_amx.py): 1.3x ATen's
# int8 kernel at 4 rows, 5x at 32 (ATen's grows with every row; one row stays ATen's).
AMX_HEAD_MIN_ROWS = 4
# Without AMX, on CPUs with AVX512-BF16 (kernels/cpu/dpbf16.py), steps from DPBF16_MIN_ROWS rows widen
# each int4 weight once per call and multiply it in registers with vdpbf16ps. On a Zen 4 (2 threads) it
# is 2.2x ATen's kernel at 32 rows and 1.05-1.25x the bf16 expansion + oneDNN GEMM at 256-2048 rows
# (~430 GFLOP/s); at 1-2 rows ATen's kernel is faster (its cost is the weight read, ours the widening).
DPBF16_MIN_ROWS = 4
DPBF16_MAX_ROWS = 1 << 20
# With AVX512-VNNI the greedy head's int8 copy takes up to this many rows through int8_gemv (int16
# activations, exact int32 sums): at 49152 x 576 on a Zen 4, 0.3-0.6 ms for one row against ATen's
# 1.1-2.3 ms, 4.2 ms for 16 rows against 5.3 ms for int8_dpbf16_matmul, which widens the weight once
# per call and takes over from 32 rows (7.8 vs 8.1 ms there). From BF16_PANEL_HEAD_MIN_ROWS rows the
# head multiplies a bf16 copy widened once (RowInt8Head.bf16_panels, +2 bytes a weight, built by the
# first such step): 5.8-7.3 ms at 32 rows against 7.7-8.2 ms for int8_dpbf16_matmul, the same numbers.
INT8_GEMV_MAX_ROWS = 32
# From 8 greedy rows the head takes int8 activations on ``vpdpbusd`` (``int8_head_vnni``, twice the
# multiply-adds of an instruction): cold, 0.65-0.69 / 1.07-1.09 / 1.90-2.01 ms at 8 / 16 / 32 rows
# against int8_gemv's 0.78-1.44 / 1.51-1.53 and the bf16 panels' 2.30-2.42 at 32 (49152 x 576, Zen 5,
# ``bench_kernels head``). Below 8 the head is a read of its weights either way, and int16 activations
# leave fewer entries to re-score (one stream: 259.9 against 249.3 tok/s).
VNNI_HEAD_MIN_ROWS = 8
# A row the byte head leaves with more candidates than this (flat logits: thousands, 0.25-0.5 us each)
# is recomputed through int8_gemv instead (~0.1-0.3 ms a row); chat rows average ~60.
RESCORE_MAX_CANDIDATES = 1024
BF16_PANEL_HEAD_MIN_ROWS = 32
DPBF16_HEAD_MIN_ROWS = 8  # without VNNI: below this ATen's int8 kernel (the widening costs 4.5 ms a call)
INT4_INVARIANT_GEMV_ROWS = 16  # batch-invariant mode: prompt rows above this take the exact fp32 GEMM
# With AVX512-VNNI and VBMI, or AVX2, steps of up to this many rows take int4_gemv (int16 activations meet
# the nibbles as integers). On a Zen 4 (2 threads, 960/3072/576 x 576 and 576 x 1536) one row costs
# 12/26/8/16 us against ATen's 23/60/16/34; a layer's four linears at 8 rows 248 us against 297 for
# int4_dpbf16_matmul, which widens each weight to bf16 once per call and wins from there on.
INT4_GEMV_MAX_ROWS = 8
# On AVX2 (no AVX-512) int4_gemv beats ATen's int4 kernel at every row count and the expanded weight's
# oneDNN GEMM up to ~16 rows; past that the GEMM wins (2.2x ATen's int4 kernel at 32 rows), so these
# CPUs skip ATen's int4 kernel (a layer stack's 120 weights, 2 threads: 8 rows 8.2 / 11.0 / 15.1 ms
# for int4_gemv / ATen / expand + GEMM, 16 rows 16.3 / 21.9 / 17.8, 32 rows 31.8 / 43.5 / 20.0).
INT4_GEMV_AVX2_MAX_ROWS = 16
# From this many activation rows a Q8_0 matmul dequantizes tiles of rows and calls ATen's GEMM, whose
# blocked AVX-512 code beats the Numba kernel once the weight read is amortized (bench_kernels.py).
Q8_0_GEMM_MIN_ROWS = 32
# A sampled step's full logits (and any Q8_0 linear) take q8_0_gemv up to this many rows: SmolLM2's
# 49152 x 576 head, cold, in 0.72-0.74 / 0.70-0.72 / 3.1-3.2 ms at 1 / 4 / 32 rows against the float32
# kernels' 3.0-3.4 / 6.4-7.8 / 18.5-19.5 (Zen 5, 2 threads); each row's arithmetic is its own, so
# batch-invariant at any count.
Q8_0_GEMV_MAX_ROWS = 256
Q8_0_GEMM_TILE_ROWS = 1024  # 2.4 MB of float32 at K=576: the tile stays in L2 between dequantize and GEMM
# Without AMX, steps carry at most this many tokens by default. On a 2-core Zen 4 serving 32 chats
# (loadgen, --ignore-eos), 2048 / 1024 / 512 / 256 gave 290 / 299 / 325-341 / 319 out tok/s and a TTFT
# p50 of 2.6 / 1.5 / 0.9 / 0.74 s: new prompts join the decodes a few at a time instead of in one
# multi-second step that all the streams wait for.
CPU_STEP_TOKENS = 512
# On AMX the default step budget is the most rows a step with prompts runs in the one region, where
# that is at least this many (``CPUBackend.step_tokens``); smaller limits (a 1B model's 8,192-input down
# projection allows 128 rows) keep 2,048-token steps on oneDNN's GEMM.
FUSED_STEP_MIN_TOKENS = 512


class CPUBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device="cpu", threads: int | None = None, warmup: bool = True,
                 batch_invariant: bool | None = None) -> None:
        super().__init__(device, threads, batch_invariant, warmup)
        threads = threads or int(os.environ.get("EDGELLM_THREADS", "0")) or default_threads()
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.threads = threads
        self._kv_views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self._step_rows = self._decode_rows = -1
        self._invariant = self.batch_invariant  # this step's arithmetic, set by begin_step
        self._meta_key: tuple = ()
        self._meta_np: tuple[np.ndarray, ...] = ()
        self._stacks: dict[tuple[int, bool], tuple] = {}  # decoder_layers' stacks, by layer list and widening
        # a few rows' decode steps run all layers in one call; EDGELLM_FUSED_LAYERS=0 takes the ops one by one
        self._fused_layers = os.environ.get("EDGELLM_FUSED_LAYERS", "1") != "0"
        use_amx = os.environ.get("EDGELLM_AMX", "1") != "0" and request_amx()
        self._amx_config = make_tile_config() if use_amx else None
        self._amx_int8 = use_amx and amx_int8_supported()
        # without AMX, AVX512-BF16 dot products (AMD Zen 4, Intel Cooper Lake) take batched int4 steps,
        # the int8 head and decode attention's scores instead; EDGELLM_DPBF16=0 turns them off
        self._dpbf16 = (not use_amx and os.environ.get("EDGELLM_DPBF16", "1") != "0" and dpbf16_supported())
        self._vnni = os.environ.get("EDGELLM_VNNI", "1") != "0" and vnni_supported()
        # the head's int16 kernel (int8_gemv) on AVX512-VNNI, or on AVX2 where the CPU has no VNNI
        self._int16_head = self._vnni or (not vnni_supported() and int8_gemv_runs())
        # a few rows meet the int4 nibbles as integers (kernels/cpu/int4_gemv.py): on AVX512-VNNI and VBMI
        # unless EDGELLM_VNNI=0, or on AVX2 (most laptops), where ATen's int4 kernel is ~2x slower
        gemv = int4_gemv_isa()
        self._gemv_rows = 0
        if gemv == "avx2":
            self._gemv_rows = INT4_GEMV_AVX2_MAX_ROWS
        elif gemv == "avx512" and self._vnni:
            self._gemv_rows = AMX_MIN_ROWS - 1 if use_amx else INT4_GEMV_MAX_ROWS
        self._int4_kernel_rows = 0 if gemv == "avx2" else INT4_KERNEL_MAX_ROWS
        lo, hi = ((AMX_MIN_ROWS, AMX_MAX_ROWS) if use_amx else
                  (DPBF16_MIN_ROWS, DPBF16_MAX_ROWS) if self._dpbf16 else (1, 0))
        if self._gemv_rows:
            lo, hi = 1, max(hi, self._gemv_rows)
        self._batched_rows = (lo, hi)
        self._warm = warmup
        if warmup:
            self.warmup()

    def warmup(self) -> float:
        """Compile (first run, with a helper process) or load from Numba's cache (later ones) the kernels
        a step uses (``backends/cpu_warmup.py``)."""
        elapsed = warm_up(self)
        logger.debug("CPU kernels ready in %.2f s", elapsed)
        return elapsed

    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The base class's pool; a warmed-up backend also loads the kernels an int8 cache takes."""
        if self._warm and dtype == torch.int8:
            logger.debug("int8 KV cache kernels ready in %.2f s", warm_up_cache(self, dtype))
        return super().allocate_kv_cache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype)

    @property
    def uses_amx(self) -> bool:
        """Whether mid-sized int4 steps run on AMX tiles (the CPU has AMX-BF16; ``EDGELLM_AMX`` != 0)."""
        return self._amx_config is not None

    @property
    def _speculates(self) -> bool:
        """Whether greedy requests draft tokens unasked: where decode steps run in one region
        (``decode_step_spin``: AMX or AVX512-BF16, two threads or more), whose verified rows attend
        and multiply as decodes do, so the tokens are those of plain decoding; never in batch-invariant
        mode, whose outputs must not depend on how many run."""
        return (self._fused_layers and self.threads > 1 and not self.batch_invariant
                and (self.uses_amx or self._dpbf16) and bool(self._gemv_rows))

    def capabilities(self) -> Capabilities:
        return Capabilities(
            name=self.name,
            device="cpu",
            dtypes=(torch.float32, torch.bfloat16),
            default_dtype=torch.float32,
            kv_cache_bytes_available=int(psutil.virtual_memory().available),
            native_quant_formats=("Q4_0", "Q4_1", "Q8_0"),
            step_tokens=2048 if self.uses_amx else CPU_STEP_TOKENS,
            speculative_tokens=SPECULATIVE_TOKENS if self._speculates else 0,
            speculative_max_seqs=SPECULATIVE_MAX_SEQS,
            notes={"isa": torch.backends.cpu.get_cpu_capability(), "threads": self.threads, "amx": self.uses_amx,
                   "avx512_bf16_kernels": self._dpbf16, "vnni_head": self._vnni},
        )

    def prepare_weight(self, weight: Any, dtype: torch.dtype, role: str = "linear") -> Any:
        if isinstance(weight, QuantizedTensor) and weight.fmt in ("Q4_0", "Q4_1"):
            return Int4PackedWeight.from_quantized(weight)
        if isinstance(weight, QuantizedTensor) and weight.fmt == "Q8_0":
            # Logits stay exact float32 Q8_0 products: bf16 logits tie often enough to change greedy
            # answers. An output head also gets a per-row int8 copy (+1 byte per weight) for the
            # argmax-only steps of ``logits``, where exact re-scoring keeps every answer the same.
            return Q8_0Weight.from_quantized(weight, head=role in ("lm_head", "tied_embedding"))
        return super().prepare_weight(weight, dtype, role)

    def linear_input_dtype(self, weight: Any, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if isinstance(weight, Int4PackedWeight) else dtype

    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (bias is None and type(weight) is Int4PackedWeight and x.dtype == torch.bfloat16 and x.dim() == 2
                and self._takes_batched(x.shape[0], x.shape[1])
                and not self._invariant and weight.expandable and x.is_contiguous()):
            return self._int4_batched_linear(x, weight)  # a batched step's linears: the short path
        if isinstance(weight, Int4PackedWeight):  # bf16 in, bf16 out; other dtypes convert both ways
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
                x2 = x2.to(torch.bfloat16).contiguous()
            y = self._int4_linear(x2, weight)
            if x.dtype != torch.bfloat16:
                y = y.to(x.dtype)
            if x.dim() != 2:
                y = y.reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
            y = F.linear(x.to(torch.bfloat16), weight).to(x.dtype)
            return y if bias is None else y + bias
        if isinstance(weight, Q8_0Weight):
            y = self._q8_0_linear(x.reshape(-1, x.shape[-1]), weight).to(x.dtype)
            y = y.reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return super().linear(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None, out_dtype=None):
        """One Numba call: float32 or bf16 in and out, the residual stream float32."""
        out_dtype = out_dtype or x.dtype
        if (x.dtype not in _NUMBA_DTYPES or out_dtype not in _NUMBA_DTYPES or weight.dtype != torch.float32
                or not x.is_contiguous() or (residual is not None and residual.dtype != torch.float32)):
            return super().rms_norm(x, weight, eps, residual, out_dtype)
        flat = x.dim() == 2  # the models' [tokens, hidden]: no views to make (each costs a microsecond)
        x2 = x if flat else x.view(-1, x.shape[-1])
        if residual is None:
            res = torch.empty(x2.shape, dtype=torch.float32)
        else:
            res = residual if flat else residual.view(x2.shape)
        out, out_np = _new_array(x2.shape, out_dtype)
        args = (_as_numpy(x2), res.numpy(), weight.numpy(), float(eps), out_np, residual is not None)
        if x2.shape[0] >= ROW_PARALLEL_MIN_ROWS and self.threads > 1:
            add_rms_norm_parallel(*args, self.threads)
        else:
            add_rms_norm(*args)
        return (out, res) if flat else (out.view(x.shape), res.view(x.shape))

    def _gemv_step(self, x: torch.Tensor, weight: Any) -> bool:
        """Whether ``x`` (2-D, contiguous) meets ``weight`` in ``int4_gemv``: a few rows of a packed
        int4 weight, outside batch-invariant mode."""
        return (type(weight) is Int4PackedWeight and x.dim() == 2 and 1 <= x.shape[0] <= self._gemv_rows
                and not self._invariant and weight.expandable and x.is_contiguous())

    def norm_linear(self, x, norm_weight, eps, residual, weight, bias=None, norm_dtype=None):
        """A few rows into a packed int4 projection: the norm and ``int4_gemv`` in one Numba call
        (``norm_int4_gemv``), the norm still rounded to bf16 as ``rms_norm`` returns it."""
        if not (bias is None and norm_dtype == torch.bfloat16 and x.dtype in _NUMBA_DTYPES
                and norm_weight.dtype == torch.float32 and self._gemv_step(x, weight)
                and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()))):
            return super().norm_linear(x, norm_weight, eps, residual, weight, bias, norm_dtype)
        res = residual if residual is not None else torch.empty(x.shape, dtype=torch.float32)
        out, out_np = _new_array((x.shape[0], weight.shape[0]), torch.bfloat16)
        packed, sz = weight.gemv_operands
        norm_int4_gemv(_as_numpy(x), res.numpy(), norm_weight.numpy(), float(eps), residual is not None, packed, sz,
                       out_np, self.threads)
        return out, res

    def act_linear(self, x, act, weight):
        """A few rows of a gated MLP: SiLU-and-mul and ``int4_gemv`` in one Numba call (``silu_int4_gemv``)."""
        if not (act == "silu" and x.dtype == torch.bfloat16 and self._gemv_step(x, weight)):
            return super().act_linear(x, act, weight)
        out, out_np = _new_array((x.shape[0], weight.shape[0]), torch.bfloat16)
        silu_int4_gemv(_as_numpy(x), *weight.gemv_operands, out_np, self.threads)
        return out

    def rotary(self, q, k, positions, cos_sin):
        """float32 ``q, k`` rotate in place; bf16 ones (views of the qkv projection) into new float32
        tensors, so attention and the cache see the same numbers as from a float32 projection."""
        if q.dtype not in _NUMBA_DTYPES or k.dtype != q.dtype or cos_sin.dtype != torch.float32:
            return super().rotary(q, k, positions, cos_sin)
        if q.dtype == torch.float32:
            q_out, k_out = q, k
        else:
            q_out = torch.empty(q.shape, dtype=torch.float32)
            k_out = torch.empty(k.shape, dtype=torch.float32)
        args = (_as_numpy(q), _as_numpy(k), positions.numpy(), cos_sin.numpy(), q_out.numpy(), k_out.numpy())
        if q.shape[0] >= ROW_PARALLEL_MIN_ROWS and self.threads > 1:
            rope_neox_parallel(*args, self.threads)
        else:
            rope_neox(*args)
        return q_out, k_out

    def act_and_mul(self, x, act="silu"):
        if act != "silu" or x.dtype not in _NUMBA_DTYPES or not x.is_contiguous():
            return super().act_and_mul(x, act)
        flat = x.dim() == 2
        x2 = x if flat else x.view(-1, x.shape[-1])
        out, out_np = _new_array((x2.shape[0], x2.shape[1] // 2), x.dtype)
        if x2.shape[0] >= PARALLEL_MIN_ROWS and self.threads > 1:
            silu_and_mul_parallel(_as_numpy(x2), out_np, self.threads)
        else:
            silu_and_mul(_as_numpy(x2), out_np)
        return out if flat else out.view(*x.shape[:-1], -1)

    def decoder_layers(self, h, layers, shape, kv_caches, positions, cos_sin, meta):
        """A decode step runs every layer in one Numba call (``kernels/cpu/decode_layers.py``): a few
        rows (``int4_gemv``'s) on any CPU with it, more where the AVX512-BF16 or AMX kernels take them
        (AMX: up to ``AMX_MAX_ROWS``, bf16 cache). The same kernels as the ops one by one, without
        ~10 us of Python and dispatch around each of 5-10 calls a layer. Steps with prompt rows take
        it on AMX (two threads or more) and AVX512-BF16 CPUs (``_prompts_fuse``), else the ops."""
        t = h.shape[0]
        stack = None
        prompts = meta.num_decode_tokens < t
        if (self._fused_layers and 1 <= t and not self._invariant and h.dim() == 2
                and h.dtype in _NUMBA_DTYPES and h.is_contiguous()
                and (t <= self._gemv_rows or self._dpbf16
                     or (self.uses_amx and (t <= AMX_MAX_ROWS or (prompts and self._tiles_take(layers, t)))))
                and (not prompts or self._prompts_fuse(shape, kv_caches, t))):
            stack = self._layer_stack(layers, shape, kv_caches, cos_sin)
            if stack is not None and t > self._gemv_rows and stack[0] is decode_layers:
                stack = None
            if stack is not None and prompts and stack[0] is not (decode_layers_amx if self.uses_amx else
                                                                  decode_layers_dp):
                stack = None
        if stack is None:
            return super().decoder_layers(h, layers, shape, kv_caches, positions, cos_sin, meta)
        kernel, typed = stack
        if not prompts and self._reads_wide(kernel, t):
            kernel, typed = self._layer_stack(layers, shape, kv_caches, cos_sin, wide=True)
        extra = ()
        if kernel in (decode_layers_amx, decode_layers_dp):  # how many sequences decode: they come first
            qsl = meta.query_start_loc_list or meta.query_start_loc.tolist()
            n_dec = qsl.index(meta.num_decode_tokens) if prompts else len(qsl) - 1
            extra = (self._amx_config, n_dec) if kernel is decode_layers_amx else (n_dec,)
        residual, res_np = _new_array(h.shape, torch.float32)
        slots, starts, lens, tables = self._meta_arrays(meta)
        work = meta.num_decode_tokens * shape.num_heads * meta.max_seq_len
        x = kernel(_as_numpy(h), res_np, typed, positions.numpy(), cos_sin.numpy(), slots, starts, lens, tables,
                   float(shape.scale), int(shape.sliding_window or 0), float(shape.eps), shape.num_heads,
                   shape.head_dim, self.threads, self.threads if work >= SERIAL_ATTENTION_WORK else 1,
                   self._gemv_rows, self.threads if t >= ROW_PARALLEL_MIN_ROWS else 1, *extra)
        out = torch.from_numpy(x).view(torch.bfloat16)
        out._edgellm_np = x
        return out, residual

    def _tiles_take(self, layers: list[DecoderLayer], t: int) -> bool:
        """Whether every linear of a ``t``-row step stays on AMX tiles op by op (``_takes_batched``), so
        that one region running them all there gives the ops' numbers: prompt steps up to 682 rows
        for SmolLM2 (its down projection's 1,536 inputs), 1.1-1.3x the ops at 300-682 rows."""
        first = layers[0] if layers else None
        return first is not None and all(self._takes_batched(t, w.shape[1]) for w in (
            first.qkv, first.o_proj, first.gate_up, first.down))

    def prepare_batching(self, model: Any, kv_caches: list[torch.Tensor], max_num_seqs: int) -> None:
        """Where batched decode steps will read widened weights (``_wide_layers``: AVX512-BF16, more
        streams than ``int4_gemv``'s rows), widen them now: ~0.5 s for SmolLM2 on 2 cores, which the
        first such step would otherwise add to its streams' latency."""
        layers, shape = getattr(model, "layers", None), getattr(model, "shape", None)
        if self._fused_layers and not self.batch_invariant and layers and isinstance(shape, DecoderShape):
            stack = self._layer_stack(layers, shape, kv_caches, model.cos_sin)
            if stack is not None and self._reads_wide(stack[0], max_num_seqs):
                self._layer_stack(layers, shape, kv_caches, model.cos_sin, wide=True)

    def _reads_wide(self, kernel: Any, decodes: int) -> bool:
        """Whether a step of ``decodes`` decodes alone on ``kernel`` reads widened weights: the one-region
        step (``decode_layers_spin``: two threads or more) past ``int4_gemv``'s rows on AVX512-BF16."""
        return kernel is decode_layers_dp and self.threads > 1 and decodes > self._gemv_rows

    def step_tokens(self, model: Any, kv_caches: list[torch.Tensor]) -> int:
        """On AMX, the most rows a step with prompt rows runs in the one-region step (every linear on
        tiles, ``_tiles_take``) where that is ``FUSED_STEP_MIN_TOKENS`` or more: 682 for SmolLM2. 32 chat
        prompts arriving together then prefill in such steps beside the decodes of those already in,
        instead of in 2,048-token steps op by op: 1.04x the output at 32 (BENCHMARKS.md, round 41)."""
        base = self.capabilities().step_tokens
        layers, shape = getattr(model, "layers", None), getattr(model, "shape", None)
        if not (self.uses_amx and layers and isinstance(shape, DecoderShape) and self._fused_layers
                and not self.batch_invariant and self._prompts_fuse(shape, kv_caches, 0)):
            return base
        stack = self._layer_stack(layers, shape, kv_caches, model.cos_sin)
        if stack is None or stack[0] is not decode_layers_amx:  # an int8 cache's steps: the ops
            return base
        # the largest such step, found by ``_tiles_take`` itself (at most 513 checks, once at start-up)
        rows = next((t for t in range(AMX_MATMUL_MAX_ROWS, FUSED_STEP_MIN_TOKENS - 1, -1)
                     if self._tiles_take(layers, t)), 0)
        return rows or base

    def _prompts_fuse(self, shape: DecoderShape, kv_caches: list[torch.Tensor], t: int) -> bool:
        """Whether a step with prompt rows runs in one call too, with the kernels ``attention`` would
        take op by op for it (no sliding window): on AMX in ``decode_layers_amx``'s one parallel region
        (two threads or more; AMX prompt attention), else in ``decode_layers_dp`` past ``int4_gemv``'s
        rows (AVX512-BF16 prompt attention). A joining request's step then costs its decodes no more
        than a step of decodes alone does, plus its prompt's rows."""
        if shape.sliding_window or not kv_caches:
            return False
        kv, group = self._kv_view(kv_caches[0]), shape.num_heads // shape.num_kv_heads
        if self.uses_amx:
            return self.threads > 1 and prompt_amx_supports(kv, group)
        return self._dpbf16 and t > self._gemv_rows and prompt_dp_supports(kv, group)

    def _layer_stack(self, layers: list[DecoderLayer], shape: DecoderShape, kv_caches: list[torch.Tensor],
                     cos_sin: torch.Tensor, wide: bool = False) -> tuple | None:
        """``(kernel, typed layer list)`` for ``decoder_layers``' one-call path, built once per layer
        list and caches; None where a layer or cache is not what its kernels take. With ``wide``, the
        list for batched decode steps on AVX512-BF16: the first layers' projections also widened to
        bf16 (``_wide_layers``), built by the first such step (one stream alone never asks for it)."""
        hit = self._stacks.get((id(layers), wide))
        if (hit is not None and hit[0] is layers and len(hit[1]) == len(kv_caches)
                and all(a is b for a, b in zip(hit[1], kv_caches))):
            return hit[2]
        stack = None
        ok = (self._gemv_rows and shape.act == "silu" and layers
              and len(layers) == len(kv_caches) and cos_sin.dtype == torch.float32 and cos_sin.is_contiguous()
              and all(c.dtype in _CACHE_DTYPES and c.dtype == kv_caches[0].dtype for c in kv_caches)
              and all(_stackable(layer) for layer in layers))
        if ok:
            kvs = [self._kv_view(c) for c in kv_caches]
            group = shape.num_heads // shape.num_kv_heads
            kernel = (decode_layers_amx if self._amx_decodes(kvs[0], group) else
                      decode_layers_dp if self._dp_decodes(kvs[0], group) else decode_layers)
            n_wide = self._wide_layers(layers) if wide and kernel is decode_layers_dp else 0
            typed = layer_list([(layer.input_norm.numpy(), *layer.qkv.amx_operands, *layer.o_proj.amx_operands,
                                 layer.post_norm.numpy(), *layer.gate_up.amx_operands, *layer.down.amx_operands, kv,
                                 *(w.gemv_operands[1] for w in _projections(layer)),
                                 *(w.wide_panels if i < n_wide else NO_PANELS for w in _projections(layer)))
                                for i, (layer, kv) in enumerate(zip(layers, kvs))])
            stack = (kernel, typed)
        self._stacks[(id(layers), wide)] = (layers, list(kv_caches), stack)
        return stack

    def _wide_layers(self, layers: list[DecoderLayer]) -> int:
        """How many of the first layers' int4 projections a batched decode step reads widened to bf16
        (``Int4PackedWeight.wide_panels``): as many as fit ``wide_weights_budget()``, counting copies
        already built too (a stack rebuilt for new caches widens the same layers). Widening a panel
        at every call cost a 32-row step's matmuls ~15 % (SmolLM2 on a Zen 4: 120 matmuls at 32 cold
        rows 19.2 against 21.9 ms read widened), for 4x the packed bytes kept beside them."""
        budget, count = wide_weights_budget(), 0
        for layer in layers:
            need = sum(2 * w.shape[0] * w.shape[1] for w in _projections(layer))
            if need > budget:
                break
            budget -= need
            count += 1
        return count

    def populate_kv(self, kv_caches: list[torch.Tensor], start: int, end: int) -> None:
        for cache in kv_caches:
            for plane in cache:  # K, then V: blocks start:end of each are one contiguous range
                populate(plane[start:end])

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._step_rows = int(meta.slot_mapping.shape[0])
        self._decode_rows = meta.num_decode_tokens
        self._invariant = self.batch_invariant or meta.batch_invariant

    def _int4_linear(self, x: torch.Tensor, w: Int4PackedWeight) -> torch.Tensor:
        """A few rows through ``int4_gemv`` (AVX512-VNNI or AVX2) or else ATen's int4 kernel; more
        through the AMX or AVX512-BF16 kernel where the CPU has one; many (on AVX2, every row past
        ``int4_gemv``'s) as one bf16 GEMM on the expanded weight."""
        if self._invariant:
            return self._int4_linear_invariant(x, w)
        m = x.shape[0]
        if w.expandable and self._takes_batched(m, x.shape[1]):
            return self._int4_batched_linear(x, w)
        if m <= self._int4_kernel_rows or not w.expandable:
            return torch._weight_int4pack_mm_for_cpu(x, w.packed, 32, w.scale_zeros)
        return torch.mm(x, w.expand_bf16_t())

    def _takes_batched(self, m: int, k: int) -> bool:
        """Whether ``m`` rows of ``k`` inputs take ``_int4_batched_linear``: the batched range, or on AMX
        up to ``AMX_MATMUL_MAX_ROWS`` rows while the activations fit in L2."""
        lo, hi = self._batched_rows
        if lo <= m <= hi:
            return True
        return (self.uses_amx and hi < m <= AMX_MATMUL_MAX_ROWS
                and m * k <= AMX_MATMUL_MAX_ELEMENTS)

    def _int4_batched_linear(self, x: torch.Tensor, w: Int4PackedWeight) -> torch.Tensor:
        """``x`` (bf16, contiguous): a few rows through ``int4_gemv``, more through ``int4_amx_matmul``
        or, without AMX, ``int4_dpbf16_matmul``."""
        out, out_np = _new_array((x.shape[0], w.shape[0]), torch.bfloat16)
        packed, sz = w.amx_operands
        if x.shape[0] <= self._gemv_rows:
            int4_gemv(x.view(torch.uint16).numpy(), *w.gemv_operands, out_np, self.threads)
        elif self._amx_config is not None:
            int4_amx_matmul(x.view(torch.uint16).numpy(), packed, sz, out_np, self._amx_config, self.threads)
        else:
            int4_dpbf16_matmul(x.view(torch.uint16).numpy(), packed, sz, out_np, self.threads)
        return out

    def _int4_linear_invariant(self, x: torch.Tensor, w: Int4PackedWeight) -> torch.Tensor:
        """Generated tokens through ATen's int4 kernel, prompt tokens through an exact fp32 GEMM.

        Both compute "fp32 dequantize, fp32 accumulate, round to bf16"; choosing by the kind of token
        (not the batch size) keeps every token's numbers the same alone or in any batch.
        """
        m = x.shape[0]
        split = self._decode_rows if m == self._step_rows else (m if m <= INT4_INVARIANT_GEMV_ROWS else 0)
        if not w.expandable:  # no expansion kernel for ragged row blocks: the int4 kernel does all
            split = m
        if split >= m:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, 32, w.scale_zeros)
        prompt = _tiled_mm(x[split:].float(), w.expand_f32_t()).to(torch.bfloat16)
        if split == 0:
            return prompt
        gen = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:split], w.packed, 32, w.scale_zeros)
        return torch.cat([gen, prompt])

    def _q8_0_linear(self, x: torch.Tensor, w: Q8_0Weight) -> torch.Tensor:
        """A Q8_0 weight (a tied head's full logits, Q8_0 layers): ``q8_0_gemv`` (activations as int16 in
        groups of 32, exact block sums) up to ``Q8_0_GEMV_MAX_ROWS`` rows, and at any row count in
        batch-invariant mode (a row's numbers are its own there); the float32 kernels past it."""
        xf = x.float().contiguous()
        m, n = xf.shape[0], w.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        if (m <= Q8_0_GEMV_MAX_ROWS or self._invariant) and q8_0_gemv_supports(w.shape[1]):
            xq, xs, _ = quantize_groups_int16_f32(xf.numpy())
            q8_0_gemv(xq, xs, *w.gemv_panels(), y.numpy(), self.threads)
            return y
        if m < Q8_0_GEMM_MIN_ROWS:
            q8_0_matmul(xf.numpy(), w.qs, w.d, y.numpy(), self.threads)
            return y
        tile = torch.empty(min(Q8_0_GEMM_TILE_ROWS, n), w.shape[1], dtype=torch.float32)
        for n0 in range(0, n, Q8_0_GEMM_TILE_ROWS):
            rows = tile[: min(Q8_0_GEMM_TILE_ROWS, n - n0)]
            q8_0_dequantize(w.qs, w.d, n0, rows.numpy())
            torch.mm(xf, rows.t(), out=y[:, n0:n0 + rows.shape[0]])
        return y

    def logits(self, hidden: torch.Tensor, weight: Any, argmax_cols: int | None = None) -> torch.Tensor:
        """Argmax-only steps take the approximate head (``_approx_head``); other steps the exact Q8_0 head."""
        approx = None if argmax_cols is None else self._approx_head(hidden, weight, argmax_cols)
        return super().logits(hidden, weight, argmax_cols) if approx is None else approx[0]

    def greedy_tokens(self, hidden: torch.Tensor, weight: Any, vocab: int) -> torch.Tensor:
        approx = self._approx_head(hidden, weight, vocab)
        return super().greedy_tokens(hidden, weight, vocab) if approx is None else approx[1]

    def _approx_head(self, hidden: torch.Tensor, weight: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits, argmax)`` of a Q8_0 head for callers that take only each row's argmax over the
        first ``vocab`` columns, or None where this does not apply (not a Q8_0 head, batch-invariant
        mode, or a big step without a batched int8 kernel).

        The int8 copy of the head gives approximate logits: with AVX512-VNNI, ``int8_gemv`` for up
        to 7 rows (activations quantized to int16, exact integer sums) and ``int8_head_vnni`` from 8
        (int8 activations in groups of 32, ~60 candidates a row to re-score; a flat row with more than
        ``RESCORE_MAX_CANDIDATES`` is redone on ``int8_gemv``); with AMX, from 4 rows up to
        256, ``int8_head_amx`` (the same int16 activations and numbers on AMX-INT8 tiles, 1.6-2x
        ``int8_amx_matmul``, which widens the weight to bf16 and stays for CPUs without AMX-INT8);
        with AVX512-BF16 and without VNNI (or ``EDGELLM_VNNI=0``), ``bf16_panels_matmul`` from 32
        (``int8_dpbf16_matmul`` from 8); else ATen's ``_weight_int8pack_mm`` for a few rows. ``q8_0_rescore`` then recomputes exactly every entry
        that could be a row's maximum, with the activations the kernel used, and returns the exact
        argmax; after the byte head and ``int8_head_amx``, which bound each logit's error as they store
        it, only that recompute is left (``q8_0_rescore_screened``).
        """
        head = weight.argmax_head if isinstance(weight, Q8_0Weight) else None
        if head is None or self._invariant:
            return None
        m, (n, k) = hidden.shape[0], weight.shape
        amx = self.uses_amx and AMX_HEAD_MIN_ROWS <= m <= AMX_MAX_ROWS and n % 32 == 0
        vnni_bytes = self._vnni and m >= VNNI_HEAD_MIN_ROWS and vnni_head_supports(k) and not amx
        vnni = self._int16_head and m < INT8_GEMV_MAX_ROWS and k % 32 == 0 and not amx and not vnni_bytes
        batched = amx or (self._dpbf16 and DPBF16_HEAD_MIN_ROWS <= m <= DPBF16_MAX_ROWS and n % 32 == 0)
        if not (vnni_bytes or vnni or batched or m < Q8_0_GEMM_MIN_ROWS):
            return None
        x = hidden.float().contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        int16_tiles = amx and self._amx_int8 and int8_head_supports(n, k)
        valid = min(vocab, n)
        if vnni_bytes:  # the kernel bounds each panel's errors as it stores it: only re-scoring is left
            xq, s, off, x_used = quantize_groups(x.numpy())
            x_n, act_n = row_norms(x.numpy(), x_used)
            lows, highs = (np.empty((m, -(-n // SCREEN_COLS)), np.float32) for _ in range(2))
            screen = (head.err_norm[:valid], head.w_norm[:valid], x_n, act_n, lows, highs)
            int8_head_vnni(xq, s, off, head.vnni_panels(), head.scale_f32, out.numpy(), self.threads, screen)
        elif vnni or int16_tiles:
            xq, s = quantize_rows_int16(x.numpy(), xq_limit(k))
            x_used = xq.astype(np.float32) * s[:, None]
            if int16_tiles:  # the tiles bound each 16 columns as they store them: only re-scoring is left
                x_n, act_n = row_norms(x.numpy(), x_used)
                screen = amx_head_screen(m, n, valid, head.err_norm, head.w_norm, x_n, act_n)
                int8_head_amx(xq, s, head.qw.numpy(), head.scale_f32, out.numpy(), self._amx_config, self.threads,
                              screen)
                lows, highs = amx_screen_bounds(screen, m)
            else:
                int8_gemv(xq, s, head.qw.numpy(), head.scale_f32, out.numpy(), self.threads)
        else:
            xb = x.to(torch.bfloat16)
            x_used = xb.float().numpy()
            if batched:
                args = (xb.view(torch.uint16).numpy(), head.qw.numpy(), head.scale_f32, out.numpy())
                if amx:
                    int8_amx_matmul(*args, self._amx_config, self.threads)
                elif m >= BF16_PANEL_HEAD_MIN_ROWS:
                    bf16_panels_matmul(args[0], head.bf16_panels(), head.scale_f32, args[3], self.threads)
                else:
                    int8_dpbf16_matmul(*args, self.threads)
            else:
                out = torch._weight_int8pack_mm(xb, head.qw, head.scale).float()
        best = torch.empty(m, dtype=torch.int64)
        cap = RESCORE_MAX_CANDIDATES if vnni_bytes else 0
        if vnni_bytes or int16_tiles:
            q8_0_rescore_screened(x.numpy(), weight.qs, weight.d, head.err_norm, head.w_norm, x_n, act_n, valid,
                                  out.numpy(), lows, highs, SCREEN_COLS if vnni_bytes else AMX_SCREEN_COLS, best.numpy(),
                                  cap)
        else:
            q8_0_rescore(x.numpy(), x_used, weight.qs, weight.d, head.err_norm, head.w_norm, valid, out.numpy(),
                         best.numpy(), cap)
        if cap:
            self._rescore_flat_rows(x, weight, valid, out, best)
        return out, best

    def _rescore_flat_rows(self, x: torch.Tensor, weight: Any, vocab: int, out: torch.Tensor,
                           best: torch.Tensor) -> None:
        """Rows the byte head left with too many candidates (``best`` -1): their logits again from
        int16 activations (``int8_gemv``, exact integer sums), which leave ~10 a row, then re-scored."""
        rows = torch.nonzero(best < 0).flatten()
        head, k = weight.argmax_head, x.shape[1]
        for r0 in range(0, rows.numel(), INT8_GEMV_MAX_ROWS):
            idx = rows[r0:r0 + INT8_GEMV_MAX_ROWS]
            xs = x[idx].contiguous()
            xq, s = quantize_rows_int16(xs.numpy(), xq_limit(k))
            sub = torch.empty(idx.numel(), out.shape[1], dtype=torch.float32)
            int8_gemv(xq, s, head.qw.numpy(), head.scale_f32, sub.numpy(), self.threads)
            sub_best = torch.empty(idx.numel(), dtype=torch.int64)
            q8_0_rescore(xs.numpy(), xq.astype(np.float32) * s[:, None], weight.qs, weight.d, head.err_norm,
                         head.w_norm, vocab, sub.numpy(), sub_best.numpy())
            out[idx], best[idx] = sub, sub_best

    def embedding(self, ids: torch.Tensor, weight: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(weight, Q8_0Weight) or (isinstance(weight, QuantizedTensor) and weight.fmt == "Q8_0"):
            flat = ids.reshape(-1).to(torch.int64).contiguous().numpy()
            out = torch.empty(flat.shape[0], weight.shape[1], dtype=torch.float32)
            if isinstance(weight, Q8_0Weight):
                q8_0_rows(weight.qs, weight.d, flat, out.numpy())
            else:
                q8_0_rows_raw(weight.data.numpy(), flat, out.numpy())
            return out.reshape(*ids.shape, -1).to(dtype)
        return super().embedding(ids, weight, dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                  soft_cap: float | None = None) -> torch.Tensor:
        """Paged attention over a float32, bfloat16 or int8 cache; float32 math, ``v``'s dtype out.

        Decodes read the cache in place with the Numba kernel. Prompt chunks (outside batch-invariant
        mode) go to torch's flash attention, several times faster for long chunks than the Numba
        kernel, whose per-tile arithmetic is instead the same at any chunking.
        """
        qf, kf = q.float().contiguous(), k.float().contiguous()
        # the kernels write v's dtype (float32 or bf16, rounded once) directly
        out = torch.empty(q.shape, dtype=v.dtype if v.dtype in _NUMBA_DTYPES else torch.float32)
        slots, starts, lens, tables = self._meta_arrays(meta)
        kv = self._kv_view(kv_cache)
        qsl = meta.query_start_loc_list or meta.query_start_loc.tolist()
        n_seqs = len(qsl) - 1
        n_dec = qsl.index(meta.num_decode_tokens)  # decodes come first
        sdpa = not (self._invariant or soft_cap) and n_dec < n_seqs
        n_numba, t_numba = (n_dec, meta.num_decode_tokens) if sdpa else (n_seqs, q.shape[0])
        # v may stay a bf16 view of the projection: the kernels widen it as they store it
        q_np, k_np = qf.numpy(), kf.numpy()
        v_np = _as_numpy(v if v.dtype in _NUMBA_DTYPES else v.float())
        if sdpa:
            if q.shape[0] - t_numba >= ROW_PARALLEL_MIN_ROWS and self.threads > 1:
                write_kv_parallel(kv, k_np[t_numba:], v_np[t_numba:], slots[t_numba:], self.threads)
            else:
                write_kv(kv, k_np[t_numba:], v_np[t_numba:], slots[t_numba:])
        group = q.shape[1] // k.shape[1]
        if n_numba:
            work = t_numba * q.shape[1] * meta.max_seq_len
            args = (_as_numpy(out)[:t_numba], q_np[:t_numba], k_np[:t_numba], v_np[:t_numba], kv, slots[:t_numba],
                    starts[:n_numba + 1], lens[:n_numba], tables[:n_numba], float(scale), int(sliding_window or 0),
                    float(soft_cap or 0.0), DEFAULT_Q_TILE, self.threads if work >= SERIAL_ATTENTION_WORK else 1)
            if self._amx_decodes(kv, group):
                paged_attention_step_amx(*args, self._amx_config)
            elif self._dp_decodes(kv, group):
                paged_attention_step_dp(*args)
            else:
                paged_attention_step(*args)
        amx = self._amx_config is not None and prompt_amx_supports(kv, group)
        if sdpa and not sliding_window and (amx or (self._dpbf16 and prompt_dp_supports(kv, group))):
            # prompt chunks in one Numba call on AMX tiles (2.5x torch's flash attention on 32 chat
            # prompts, 1.6x on one of 512 tokens) or AVX512-BF16 (1.5-2x on a Zen 4). Their output is
            # bf16, as flash attention's over a bf16 cache is, whatever v's dtype.
            ob = out if out.dtype == torch.bfloat16 else torch.empty(q.shape, dtype=torch.bfloat16)
            if amx:
                prompt_attention_amx(_as_numpy(ob), q_np, kv, starts, lens, tables, n_numba, n_seqs, float(scale),
                                     self._amx_config, self.threads)
            else:
                prompt_attention_dp(_as_numpy(ob), q_np, kv, starts, lens, tables, n_numba, n_seqs, float(scale),
                                    self.threads)
            if ob is not out:
                out[t_numba:] = ob[t_numba:]
            return out if out.dtype == v.dtype else out.to(v.dtype)
        lens_list = meta.seq_lens_list or meta.seq_lens.tolist()
        for i in range(n_numba, n_seqs):
            self._prompt_attention(qsl[i], qsl[i + 1], lens_list[i], meta.block_tables[i], qf, kf, v, kv_cache,
                                   meta.block_size, scale, sliding_window, out)
        return out if out.dtype == v.dtype else out.to(v.dtype)

    def rope_attention(self, qkv, num_heads, num_kv_heads, head_dim, positions, cos_sin, kv_cache, meta, scale,
                       sliding_window=None):
        """Rotary reads q and k straight from the projection rows (3x faster than through strided
        views). Steps whose every row attends in the Numba kernel (decodes, or any step in
        batch-invariant mode) also write the cache and attend in the same dispatch; others go on
        to ``attention``."""
        t = qkv.shape[0]
        if (qkv.dtype not in _NUMBA_DTYPES or cos_sin.dtype != torch.float32 or kv_cache.dtype not in _CACHE_DTYPES
                or not qkv.is_contiguous()):
            return super().rope_attention(qkv, num_heads, num_kv_heads, head_dim, positions, cos_sin, kv_cache,
                                          meta, scale, sliding_window)
        qkv_np = _as_numpy(qkv)
        if not (self._invariant or meta.num_decode_tokens == t):
            q = torch.empty(t, num_heads, head_dim)
            k = torch.empty(t, num_kv_heads, head_dim)
            args = (qkv_np, positions.numpy(), cos_sin.numpy(), q.numpy(), k.numpy())
            if t >= ROW_PARALLEL_MIN_ROWS and self.threads > 1:
                rope_neox_qk_parallel(*args, self.threads)
            else:
                rope_neox_qk(*args)
            v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(t, num_kv_heads, head_dim)
            o = self.attention(q, k, v, kv_cache, meta, scale, sliding_window)
            return o.view(t, num_heads * head_dim)
        out = torch.empty(t, num_heads * head_dim, dtype=qkv.dtype)
        slots, starts, lens, tables = self._meta_arrays(meta)
        work = t * num_heads * meta.max_seq_len
        kv = self._kv_view(kv_cache)
        args = (_as_numpy(out).reshape(t, num_heads, head_dim), qkv_np, positions.numpy(), cos_sin.numpy(), kv, slots,
                starts, lens, tables, float(scale), int(sliding_window or 0), 0.0, DEFAULT_Q_TILE,
                self.threads if work >= SERIAL_ATTENTION_WORK else 1)
        if self._amx_decodes(kv, num_heads // num_kv_heads):
            rope_attention_step_amx(*args, self._amx_config)
        elif self._dp_decodes(kv, num_heads // num_kv_heads):
            rope_attention_step_dp(*args)
        else:
            rope_attention_step(*args)
        return out

    def _amx_decodes(self, kv: np.ndarray, group: int) -> bool:
        """Whether decode rows attend on AMX tiles (``attention_amx``): bf16 caches of head size 64."""
        return self._amx_config is not None and amx_attention_supports(kv, group)

    def _dp_decodes(self, kv: np.ndarray, group: int) -> bool:
        """Whether decode rows' scores run on AVX512-BF16 (``attention_dpbf16``), on CPUs without AMX."""
        return self._dpbf16 and dp_attention_supports(kv, group)

    @staticmethod
    def _prompt_attention(q0: int, q1: int, ctx: int, table: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, kv_cache: torch.Tensor, bs: int, scale: float, window: int | None,
                          out: torch.Tensor) -> None:
        """One prompt chunk (rows ``q0:q1``, ``ctx`` keys) through flash attention (causal, GQA)."""
        n = q1 - q0
        # keys and values from a bf16 cache are bf16 numbers: flash attention in bf16 (float32 softmax and
        # sums) is 2.4-3.2x faster than in float32 here, and only q rounds (teacher-forced agreement with
        # the float32 reference 99.6 %, 99.0 % in float32: within noise)
        # (an int8 cache's values, codes times scales, go through bf16 too: 2^-9 on top of its 1/254)
        int8 = kv_cache.dtype == torch.int8
        dt = torch.bfloat16 if kv_cache.dtype in (torch.bfloat16, torch.int8) else torch.float32
        load = (lambda x: dequantize_kv_rows(x, dt)) if int8 else (lambda x: x.to(dt))
        qi = q[q0:q1].to(dt).transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if ctx == n:  # no cached prefix: this chunk's own keys and values, as the cache holds them
            own = (lambda x: load(quantize_kv_rows(x))) if int8 else (lambda x: x.to(kv_cache.dtype).to(dt))
            ki, vi = (own(t[q0:q1]).transpose(0, 1).unsqueeze(0) for t in (k, v))
        else:
            blocks = table[: -(-ctx // bs)].long()

            def gather(plane: int) -> torch.Tensor:
                g = kv_cache[plane, blocks]  # [nb, Hkv, bs, D (+ 4 for int8)]
                g = g.transpose(0, 1).reshape(g.shape[1], -1, g.shape[3])[:, :ctx]
                return load(g).unsqueeze(0)

            ki, vi = gather(0), gather(1)
        mask = None
        if ctx != n or window:
            qpos = torch.arange(ctx - n, ctx)[:, None]
            kpos = torch.arange(ctx)[None, :]
            mask = kpos <= qpos
            if window:
                mask &= kpos > qpos - window
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
        out[q0:q1] = o[0].transpose(0, 1)

    def _kv_view(self, kv_cache: torch.Tensor) -> np.ndarray:
        """The cache as a numpy array (bf16 as its uint16 bits; int8 as itself), made once per cache tensor."""
        hit = self._kv_views.get(id(kv_cache))
        if hit is not None and hit[0] is kv_cache:
            return hit[1]
        if kv_cache.dtype in (torch.float32, torch.int8):
            view = kv_cache.numpy()
        elif kv_cache.dtype == torch.bfloat16:
            view = kv_cache.view(torch.uint16).numpy()
        else:
            raise TypeError(f"CPU paged attention supports float32, bfloat16 and int8 caches, not {kv_cache.dtype}")
        assert view.flags.c_contiguous, "KV cache must be contiguous"
        self._kv_views[id(kv_cache)] = (kv_cache, view)
        return view

    def _meta_arrays(self, meta: AttentionMetadata) -> tuple[np.ndarray, ...]:
        """Numpy views of the step's metadata, converted once per step and reused by every layer."""
        key = (meta, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables)
        if len(self._meta_key) == len(key) and all(a is b for a, b in zip(self._meta_key, key)):
            return self._meta_np
        self._meta_np = (
            meta.slot_mapping.to(torch.int64).contiguous().numpy(),
            meta.query_start_loc.to(torch.int32).contiguous().numpy(),
            meta.seq_lens.to(torch.int32).contiguous().numpy(),
            meta.block_tables.to(torch.int32).contiguous().numpy(),
        )
        self._meta_key = key
        return self._meta_np


GEMM_TILE_ROWS = 64
# Speculative decoding by default (prompt lookup, ``engine.NgramProposer``): 2 drafts a step while at
# most 2 sequences run. One greedy stream on a 2-vCPU AMX Xeon: 1.22-1.30x output tokens/s, the same
# tokens (4 drafts: 1.14-1.16x); 4 streams drafting ran 0.86-0.95x and 32 0.81-0.96x, each extra row
# of int4_gemv's costing ~0.7 ms at 2 threads (BENCHMARKS.md, round 40).
SPECULATIVE_TOKENS = 2
SPECULATIVE_MAX_SEQS = 2
_NUMBA_DTYPES = (torch.float32, torch.bfloat16)
_CACHE_DTYPES = (*_NUMBA_DTYPES, torch.int8)  # int8: rows with their scales (quant.kv_int8)


def _stackable(layer: DecoderLayer) -> bool:
    """Whether ``decode_layers`` takes this block: packed int4 projections without bias, bf16
    activations into them, float32 norms."""
    return (layer.qkv_bias is None and layer.qkv_in == torch.bfloat16 and layer.gate_up_in == torch.bfloat16
            and all(type(w) is Int4PackedWeight and w.expandable for w in (layer.qkv, layer.o_proj, layer.gate_up,
                                                                            layer.down))
            and all(n.dtype == torch.float32 and n.is_contiguous() for n in (layer.input_norm, layer.post_norm)))


def _projections(layer: DecoderLayer) -> tuple:
    return layer.qkv, layer.o_proj, layer.gate_up, layer.down


def wide_weights_budget() -> int:
    """Bytes of int4 weights a model's layers may keep widened to bf16 beside the packed ones:
    ``$EDGELLM_WIDE_WEIGHTS_MB`` (0: none), else a sixteenth of the machine's memory, at most 1 GiB
    (SmolLM2's 212 MB fit; a 1B model's first layers do)."""
    env = os.environ.get("EDGELLM_WIDE_WEIGHTS_MB")
    if env is not None:
        return max(0, int(env)) << 20
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    return min(1 << 30, total // 16)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 tensor as itself in numpy; a bf16 one as its uint16 bits (Numba has no bf16). A tensor
    from ``_new_array`` carries its array already (0.1 us against 1.5 us for the views)."""
    a = getattr(t, "_edgellm_np", None)
    if a is not None:
        return a
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _new_array(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor (float32 or bf16) and its numpy view, allocated from numpy: half the cost of
    ``torch.empty`` and a view, which counts at 240 kernel calls per decode step. The tensor keeps
    the array for ``_as_numpy`` when the next kernel takes it (views of it are new tensors, without)."""
    a = np.empty(shape, np.uint16 if dtype == torch.bfloat16 else np.float32)
    t = torch.from_numpy(a)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    t._edgellm_np = a
    return t, a


def _tiled_mm(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``x @ w_t`` in fixed 64-row tiles (the last one zero-padded).

    BLAS picks its blocking by the row count, so a row's result can change with the batch size.
    Fixed tiles give every row the same algorithm, so prompts compute the same numbers in any batch.
    """
    m = x.shape[0]
    padded = -(-m // GEMM_TILE_ROWS) * GEMM_TILE_ROWS
    if padded != m:
        x = torch.cat([x, x.new_zeros(padded - m, x.shape[1])])
    out = x.new_empty(padded, w_t.shape[1])
    for i in range(0, padded, GEMM_TILE_ROWS):
        torch.mm(x[i:i + GEMM_TILE_ROWS], w_t, out=out[i:i + GEMM_TILE_ROWS])
    return out[:m]


def default_threads() -> int:
    """Physical cores available to this process: hyperthreads slow memory-bound decode down."""
    usable = usable_cpus()
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


__all__ = ["CPUBackend", "F", "Int4PackedWeight", "Q8_0Weight"]
