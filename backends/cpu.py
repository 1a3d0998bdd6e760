"""The CPU backend: packed int4 weights through ATen's CPU int4 kernel, Numba kernels for the rest.

Paged attention reads K/V in place through block tables (``kernels/cpu/paged_attention.py``); Q8_0
weights stay int8 and are multiplied by a Numba kernel (``kernels/cpu/q8_0.py``). Kernels are
compiled with ``cache=True`` and warmed at init, so a second process only loads them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import psutil
import torch
import torch.nn.functional as F

from edgellm.backends.base import AttentionMetadata, Capabilities
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.int4_dequant import int4pack_to_f32_t
from edgellm.kernels.cpu.norm_rope import add_rms_norm, rope_neox
from edgellm.kernels.cpu.paged_attention import DEFAULT_Q_TILE, paged_attention_step
from edgellm.kernels.cpu.q8_0 import q8_0_dequantize, q8_0_matmul, q8_0_rows, q8_0_rows_raw, repack_q8_0
from edgellm.quant import QuantizedTensor

logger = logging.getLogger(__name__)

# Below this many (query row x key) pairs a step's attention runs on the calling thread: waking the
# pool costs a few microseconds idle and a whole time slice when another process holds a core.
SERIAL_ATTENTION_WORK = 1024  # below this, waking the second thread costs more than it saves
# From this many activation rows a Q8_0 matmul dequantizes tiles of rows and calls ATen's GEMM, whose
# blocked AVX-512 code beats the Numba kernel once the weight read is amortized (bench_kernels.py).
Q8_0_GEMM_MIN_ROWS = 32
INT4_GEMV_MAX_ROWS = 16  # above this, expanding the weight for a BLAS GEMM wins
Q8_0_GEMM_TILE_ROWS = 4096


@dataclass
class Int4PackedWeight:
    """Q4_0/Q4_1 repacked once for ``aten._weight_int4pack_mm_for_cpu`` (groups of 32 = GGML blocks).

    GGML gives w = d*q + m (Q4_1) or d*(q-8) (Q4_0); the kernel computes (q-8)*scale + zero, so
    scale = d and zero = m + 8d (Q4_1) or 0 (Q4_0): exact, no requantization.
    """

    packed: torch.Tensor
    scale_zeros: torch.Tensor  # [K/32, N, 2]
    shape: tuple[int, int]

    @classmethod
    def from_quantized(cls, w: QuantizedTensor) -> Int4PackedWeight:
        n, k = w.shape
        spec = 20 if w.fmt == "Q4_1" else 18
        blocks = w.data.reshape(n, k // 32, spec)
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # [N, K/32]
        zero = (blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() + 8 * d
                if w.fmt == "Q4_1" else torch.zeros_like(d))
        qs = blocks[..., spec - 16:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)  # uint8 nibbles in element order
        if n % 64 == 0:  # build ATen's layout directly: [N/64, K, 32], row j low, row j+32 high
            q = q.reshape(n // 64, 2, 32, k)
            packed = (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous().reshape(n, k // 2)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # the kernel's fast path takes bf16 activations and bf16 scales; fp32 is ~50x slower
        sz = torch.stack([d.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, sz, (n, k))

    def expand_f32_t(self) -> torch.Tensor:
        """``W^T`` as exact float32 ``[K, N]`` in a scratch buffer shared by weights of one shape."""
        n, k = self.shape
        out = _scratch(k, n)
        sz = self.scale_zeros.float()
        int4pack_to_f32_t(self.packed.view(n // 64, k, 32).numpy(), sz[..., 0].contiguous().numpy(),
                          sz[..., 1].contiguous().numpy(), 32, out.numpy())
        return out

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zeros.numel() * self.scale_zeros.element_size()


@dataclass
class Q8_0Weight:
    """Q8_0 repacked once into ``qs int8 [N, K]`` + ``d float32 [N, K/32]`` for the Numba kernels.

    Kept as numpy arrays so a call costs no tensor-to-array conversion. Exact: ``w = d * q``.
    """

    qs: np.ndarray
    d: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_quantized(cls, w: QuantizedTensor) -> Q8_0Weight:
        assert w.fmt == "Q8_0", w.fmt
        qs, d = repack_q8_0(w.data.contiguous().numpy())
        return cls(qs, d, w.shape)

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes


class CPUBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device="cpu", threads: int | None = None, warmup: bool = True) -> None:
        super().__init__(device, threads)
        threads = threads or int(os.environ.get("EDGELLM_THREADS", "0")) or default_threads()
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        self.threads = threads
        self._kv_views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self._step_rows = self._decode_rows = -1
        self._meta_key: tuple = ()
        self._meta_np: tuple[np.ndarray, ...] = ()
        if warmup:
            self.warmup()

    def warmup(self) -> float:
        """Compile (first process) or load from Numba's cache (later ones) the float32 kernels."""
        t0 = time.perf_counter()
        w = QuantizedTensor("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), (2, 32))
        self.linear(torch.zeros(1, 32), Q8_0Weight.from_quantized(w))
        self.embedding(torch.zeros(1, dtype=torch.long), w, torch.float32)
        self.embedding(torch.zeros(1, dtype=torch.long), Q8_0Weight.from_quantized(w), torch.float32)
        kv = torch.zeros(2, 1, 1, 1, 32)
        meta = AttentionMetadata(torch.zeros(1, dtype=torch.long), torch.tensor([0, 1], dtype=torch.int32),
                                 torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                 1, 1, 1, [0, 1], [1])
        x = torch.zeros(1, 1, 32)
        self.attention(x, x, x, kv, meta, 1.0)
        self._kv_views.clear()
        elapsed = time.perf_counter() - t0
        logger.debug("CPU kernels ready in %.2f s", elapsed)
        return elapsed

    def capabilities(self) -> Capabilities:
        return Capabilities(
            name=self.name,
            device="cpu",
            dtypes=(torch.float32, torch.bfloat16),
            default_dtype=torch.float32,
            kv_cache_bytes_available=int(psutil.virtual_memory().available),
            native_quant_formats=("Q4_0", "Q4_1", "Q8_0"),
            notes={"isa": torch.backends.cpu.get_cpu_capability(), "threads": self.threads},
        )

    def prepare_weight(self, weight: Any, dtype: torch.dtype, role: str = "linear") -> Any:
        if isinstance(weight, QuantizedTensor) and weight.fmt in ("Q4_0", "Q4_1"):
            return Int4PackedWeight.from_quantized(weight)
        if isinstance(weight, QuantizedTensor) and weight.fmt == "Q8_0":
            # Not bf16 for the vocab-sized head even though oneDNN's bf16 GEMV is ~1.7x faster: CPU GEMMs
            # return bf16 for bf16 inputs, and logits rounded to bf16 tie often enough to change
            # greedy answers. The Q8_0 kernel keeps float32 products and float32 logits.
            return Q8_0Weight.from_quantized(weight)
        return super().prepare_weight(weight, dtype, role)

    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, Int4PackedWeight):
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            y = self._int4_linear(x2, weight).to(x.dtype).reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
            y = F.linear(x.to(torch.bfloat16), weight).to(x.dtype)
            return y if bias is None else y + bias
        if isinstance(weight, Q8_0Weight):
            y = self._q8_0_linear(x.reshape(-1, x.shape[-1]), weight).to(x.dtype)
            y = y.reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return super().linear(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None):
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_contiguous():
            return super().rms_norm(x, weight, eps, residual)
        x2 = x.reshape(-1, x.shape[-1])
        res = residual.reshape(-1, x.shape[-1]) if residual is not None else torch.empty_like(x2)
        out = torch.empty_like(x2)
        add_rms_norm(x2.numpy(), res.numpy(), weight.numpy(), float(eps), out.numpy(), residual is not None)
        return out.view(x.shape), res.view(x.shape)

    def rotary(self, q, k, positions, cos_sin):
        if q.dtype != torch.float32 or k.dtype != torch.float32 or cos_sin.dtype != torch.float32:
            return super().rotary(q, k, positions, cos_sin)
        rope_neox(q.numpy(), k.numpy(), positions.numpy(), cos_sin.numpy())  # in place
        return q, k

    def begin_step(self, meta: AttentionMetadata) -> None:
        self._step_rows = int(meta.slot_mapping.shape[0])
        self._decode_rows = meta.num_decode_tokens

    def _int4_linear(self, x: torch.Tensor, w: Int4PackedWeight) -> torch.Tensor:
        """Generated tokens through ATen's int4 kernel, prompt tokens through an exact fp32 GEMM.

        Both compute "fp32 dequantize, fp32 accumulate, round to bf16"; choosing by the kind of token
        (not the batch size) keeps every token's numbers the same alone or in any batch.
        """
        m = x.shape[0]
        split = self._decode_rows if m == self._step_rows else (m if m <= INT4_GEMV_MAX_ROWS else 0)
        if w.shape[0] % 64:  # no expansion kernel for ragged row blocks: the int4 kernel does all
            split = m
        if split >= m:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, 32, w.scale_zeros)
        prompt = _tiled_mm(x[split:].float(), w.expand_f32_t()).to(torch.bfloat16)
        if split == 0:
            return prompt
        gen = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:split], w.packed, 32, w.scale_zeros)
        return torch.cat([gen, prompt])

    def _q8_0_linear(self, x: torch.Tensor, w: Q8_0Weight) -> torch.Tensor:
        xf = x.float().contiguous()
        m, n = xf.shape[0], w.shape[0]
        if m < Q8_0_GEMM_MIN_ROWS:
            y = torch.empty(m, n, dtype=torch.float32)
            q8_0_matmul(xf.numpy(), w.qs, w.d, y.numpy(), self.threads)
            return y
        y = torch.empty(m, n, dtype=torch.float32)
        tile = torch.empty(min(Q8_0_GEMM_TILE_ROWS, n), w.shape[1], dtype=torch.float32)
        for n0 in range(0, n, Q8_0_GEMM_TILE_ROWS):
            rows = tile[: min(Q8_0_GEMM_TILE_ROWS, n - n0)]
            q8_0_dequantize(w.qs, w.d, n0, rows.numpy())
            torch.mm(xf, rows.t(), out=y[:, n0:n0 + rows.shape[0]])
        return y

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
        """Numba paged attention over a float32 or bfloat16 cache; float32 math, ``q``'s dtype out."""
        qf = q.float().contiguous()
        out = torch.empty_like(qf)
        slots, starts, lens, tables = self._meta_arrays(meta)
        work = q.shape[0] * q.shape[1] * meta.max_seq_len
        paged_attention_step(
            out.numpy(), qf.numpy(), k.float().contiguous().numpy(), v.float().contiguous().numpy(),
            self._kv_view(kv_cache), slots, starts, lens, tables, float(scale), int(sliding_window or 0),
            float(soft_cap or 0.0), DEFAULT_Q_TILE, self.threads if work >= SERIAL_ATTENTION_WORK else 1,
        )
        return out if q.dtype == torch.float32 else out.to(q.dtype)

    def _kv_view(self, kv_cache: torch.Tensor) -> np.ndarray:
        """The cache as a numpy array (bf16 as its uint16 bits), made once per cache tensor."""
        hit = self._kv_views.get(id(kv_cache))
        if hit is not None and hit[0] is kv_cache:
            return hit[1]
        if kv_cache.dtype == torch.float32:
            view = kv_cache.numpy()
        elif kv_cache.dtype == torch.bfloat16:
            view = kv_cache.view(torch.uint16).numpy()
        else:
            raise TypeError(f"CPU paged attention supports float32 and bfloat16 caches, not {kv_cache.dtype}")
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


_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}


def _scratch(k: int, n: int) -> torch.Tensor:
    buf = _SCRATCH.get((k, n))
    if buf is None:
        buf = _SCRATCH[(k, n)] = torch.empty(k, n, dtype=torch.float32)
    return buf


def default_threads() -> int:
    """Physical cores available to this process: hyperthreads slow memory-bound decode down."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical))


__all__ = ["CPUBackend", "F", "Int4PackedWeight", "Q8_0Weight"]
