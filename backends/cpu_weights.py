"""Packed weights of the CPU backend, repacked once at load into the layouts its kernels want.

Weights stay packed in memory (resident weights ~1.0x the GGUF file), copied at load onto 2 MiB pages
where Linux grants them (``cpu_hugepages``: a batched step reads every weight). The AMX kernel widens int4
weights tile by tile from the same packed bytes; steps with many rows expand a weight to bfloat16
into a scratch buffer shared by all weights of one shape, multiply with oneDNN's bf16 GEMM, and drop
it. The one dense copy is an output head's, widened to bf16 by the first greedy step of 32+ rows on a
CPU with AVX512-BF16 (``RowInt8Head.bf16_panels``; 56 MB for SmolLM2), where it saves ~1 ms a step.
On those CPUs (without AMX) the int4 linears of batched decode steps also read copies widened to bf16
(``Int4PackedWeight.wide_panels``), within a budget (``CPUBackend``; 212 MB for SmolLM2).
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from edgellm.backends.cpu_hugepages import on_huge_pages, tensor_on_huge_pages
from edgellm.kernels.cpu.bf16_expand import int4pack_to_bf16_t
from edgellm.kernels.cpu.dpbf16 import int4_to_bf16_panels, int8_to_bf16_panels
from edgellm.kernels.cpu.int4_dequant import int4pack_to_f32_t
from edgellm.kernels.cpu.int4_gemv import block_scale_zeros
from edgellm.kernels.cpu.int8_head_vnni import vnni_panels
from edgellm.kernels.cpu.q4_repack import q4_blocks_to_int4pack
from edgellm.kernels.cpu.q8_0 import q8_0_row_int8, repack_q8_0
from edgellm.kernels.cpu.q8_0_gemv import q8_0_panels
from edgellm.quant import QuantizedTensor


@dataclass
class Int4PackedWeight:
    """Q4_0/Q4_1 repacked once for ``aten._weight_int4pack_mm_for_cpu`` (groups of 32 = GGML blocks).

    GGML gives w = d*q + m (Q4_1) or d*(q-8) (Q4_0); the kernel computes (q-8)*scale + zero, so
    scale = d and zero = m + 8d (Q4_1) or 0 (Q4_0): exact, no requantization.
    """

    packed: torch.Tensor
    scale_zeros: torch.Tensor  # [K/32, N, 2] bf16
    shape: tuple[int, int]

    @classmethod
    def from_quantized(cls, w: QuantizedTensor) -> Int4PackedWeight:
        n, k = w.shape
        spec = 20 if w.fmt == "Q4_1" else 18
        blocks = w.data.contiguous().reshape(n, k // 32, spec)
        head = blocks[..., 0:spec - 16].contiguous().view(torch.float16).float()  # [N, K/32, 1 or 2]
        d = head[..., 0]
        zero = head[..., 1] + 8 * d if w.fmt == "Q4_1" else torch.zeros_like(d)
        if n % 64 == 0:  # ATen's layout directly: [N/64, K, 32], row j low nibble, row j+32 high
            packed = torch.empty(n, k // 2, dtype=torch.uint8)
            q4_blocks_to_int4pack(blocks.numpy(), packed.numpy().reshape(n // 64, k, 32))
        else:
            qs = blocks[..., spec - 16:]
            q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)  # uint8 nibbles in element order
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # the kernel's fast path takes bf16 activations and bf16 scales; fp32 is ~50x slower
        sz = torch.stack([d, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()  # [K/32, N, 2]
        return cls(tensor_on_huge_pages(packed), tensor_on_huge_pages(sz), (n, k))

    @functools.cached_property
    def amx_operands(self) -> tuple[np.ndarray, np.ndarray]:
        """The packed weight as ``[N/64, K, 32]`` and the scale-zeros as ``[K/32, N]`` uint32 (each the
        bf16 pair), for ``int4_amx_matmul``: views of the same memory."""
        n, k = self.shape
        pairs = self.scale_zeros.view(torch.int32).squeeze(-1).numpy().view(np.uint32)
        return self.packed.numpy().reshape(n // 64, k, 32), pairs

    @functools.cached_property
    def gemv_operands(self) -> tuple[np.ndarray, np.ndarray]:
        """``amx_operands`` for ``int4_gemv``: the same packed weight, and a copy of the scale-zeros
        block by block (``block_scale_zeros``, ``[N/64, K/32, 64]``; a quarter of the nibbles' bytes), which
        one decode stream reads 1.3-2x as fast as ATen's layout. Built on first use."""
        packed, sz = self.amx_operands
        return packed, on_huge_pages(block_scale_zeros(sz))

    @functools.cached_property
    def wide_panels(self) -> np.ndarray:
        """The weight widened to bf16 pairs in panels of 32 columns (``int4_to_bf16_panels``, 4x the
        packed bytes), which a batched decode step's matmuls then read instead of widening each panel
        at every call. Built on first use, only where the backend's budget allows (``CPUBackend``)."""
        return on_huge_pages(int4_to_bf16_panels(*self.amx_operands))

    @property
    def expandable(self) -> bool:
        """Whether the expansion kernels handle this weight (whole 64-row blocks only)."""
        return self.shape[0] % 64 == 0

    def expand_f32_t(self) -> torch.Tensor:
        """``W^T`` as exact float32 ``[K, N]`` in a scratch buffer shared by weights of one shape."""
        n, k = self.shape
        out = scratch(k, n, torch.float32)
        sz = self.scale_zeros.float()
        int4pack_to_f32_t(self.packed.view(n // 64, k, 32).numpy(), sz[..., 0].contiguous().numpy(),
                          sz[..., 1].contiguous().numpy(), 32, out.numpy())
        return out

    def expand_bf16_t(self) -> torch.Tensor:
        """``W^T`` as bfloat16 ``[K, N]`` in a scratch buffer shared by weights of one shape."""
        n, k = self.shape
        out = scratch(k, n, torch.bfloat16)
        int4pack_to_bf16_t(self.packed.view(n // 64, k, 32).numpy(),
                           self.scale_zeros.view(torch.uint16).numpy(), 32, out.view(torch.uint16).numpy(),
                           4 * numba.get_num_threads())
        return out

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the copies built on first use (``gemv_operands``' scale-zeros, ``wide_panels``)."""
        gemv, wide = self.__dict__.get("gemv_operands"), self.__dict__.get("wide_panels")
        return (gemv[1].nbytes if gemv else 0) + (wide.nbytes if wide is not None else 0)

    @property
    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size()
                + self.scale_zeros.numel() * self.scale_zeros.element_size() + self.cache_nbytes)


@dataclass
class RowInt8Head:
    """A per-row int8 copy of a Q8_0 output head for ATen's int8 GEMV (``_weight_int8pack_mm``, bf16
    activations: ~4x the Numba Q8_0 kernel for one row) and, with AMX, ``int8_amx_matmul`` (which
    takes the scales widened), with what bounds its error.

    ``w' = qw * scale`` per row; ``err_norm = ||w - w'||`` against the exact Q8_0 row and ``w_norm =
    ||w'||``, both rounded up, let ``q8_0_rescore`` find every entry that could be a row's argmax.
    """

    qw: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # bf16 [N]
    err_norm: np.ndarray  # float32 [N]
    w_norm: np.ndarray  # float32 [N]
    scale_f32: np.ndarray  # float32 [N], ``scale`` widened
    _panels: np.ndarray | None = field(default=None, init=False, repr=False)
    _vnni_panels: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_q8_0(cls, qs: np.ndarray, d: np.ndarray) -> RowInt8Head:
        """One parallel float64 pass over the rows (``q8_0_row_int8``): ~70 ms for a 49k x 576 head on
        2 cores, where the torch version took 0.3 s of every start-up."""
        n, k = qs.shape
        qw = np.empty((n, k), np.int8)
        scale = np.empty(n, np.uint16)
        err = np.empty(n, np.float64)
        norm = np.empty(n, np.float64)
        q8_0_row_int8(qs, d, qw, scale, err, norm)
        scale_bf16 = torch.from_numpy(scale.view(np.int16)).view(torch.bfloat16)
        return cls(torch.from_numpy(on_huge_pages(qw)), scale_bf16, _round_up_f32(err), _round_up_f32(norm),
                   scale_bf16.float().numpy())

    def bf16_panels(self) -> np.ndarray:
        """``qw`` widened to bf16 pairs in 32-row panels for ``bf16_panels_matmul`` (2 bytes a weight,
        56 MB for SmolLM2's head), built on first use: only steps of many greedy rows ask for it."""
        if self._panels is None:
            self._panels = on_huge_pages(int8_to_bf16_panels(self.qw.numpy()))
        return self._panels

    def vnni_panels(self) -> np.ndarray:
        """``qw`` plus 128 as bytes in 48-row panels for ``int8_head_vnni`` (28 MB for SmolLM2's head),
        built on first use: only greedy steps of 8 rows and more ask for it."""
        if self._vnni_panels is None:
            self._vnni_panels = on_huge_pages(vnni_panels(self.qw.numpy()))
        return self._vnni_panels

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the re-laid copies built on first use (``bf16_panels``, ``vnni_panels``)."""
        return sum(p.nbytes for p in (self._panels, self._vnni_panels) if p is not None)

    @property
    def nbytes(self) -> int:
        return (self.qw.numel() + 2 * self.scale.numel() + self.err_norm.nbytes + self.w_norm.nbytes
                + self.scale_f32.nbytes + self.cache_nbytes)


def _round_up_f32(x: np.ndarray) -> np.ndarray:
    return np.nextafter(x.astype(np.float32), np.float32(np.inf))


@dataclass
class Q8_0Weight:
    """Q8_0 repacked once into ``qs int8 [N, K]`` + ``d float32 [N, K/32]`` for the Numba kernels.

    Kept as numpy arrays so a call costs no tensor-to-array conversion. Exact: ``w = d * q``.
    """

    qs: np.ndarray
    d: np.ndarray
    shape: tuple[int, int]
    argmax_head: RowInt8Head | None = None  # output heads only: the fast path of argmax-only steps
    _panels: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def gemv_panels(self) -> tuple[np.ndarray, np.ndarray]:
        """``qs`` and ``d`` re-laid in 16-column panels for ``q8_0_gemv`` (as many bytes again as ``qs``
        and ``d``: 31 MB for SmolLM2's head), built on first use: sampled steps and Q8_0 layers ask."""
        if self._panels is None:
            self._panels = tuple(on_huge_pages(a) for a in q8_0_panels(self.qs, self.d))
        return self._panels

    @property
    def _panel_nbytes(self) -> int:
        return sum(a.nbytes for a in self._panels) if self._panels is not None else 0

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the re-laid copies built on first use (the panels and the greedy head's)."""
        return self._panel_nbytes + (self.argmax_head.cache_nbytes if self.argmax_head is not None else 0)

    @classmethod
    def from_quantized(cls, w: QuantizedTensor, head: bool = False) -> Q8_0Weight:
        assert w.fmt == "Q8_0", w.fmt
        qs, d = repack_q8_0(w.data.contiguous().numpy())
        qs, d = on_huge_pages(qs), on_huge_pages(d)
        return cls(qs, d, w.shape, RowInt8Head.from_q8_0(qs, d) if head else None)

    @property
    def nbytes(self) -> int:
        extra = self.argmax_head.nbytes if self.argmax_head is not None else 0
        return self.qs.nbytes + self.d.nbytes + extra + self._panel_nbytes


_LOCAL = threading.local()


def scratch(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused ``[rows, cols]`` buffer: an expanded weight lives only until the next one of its shape.

    One set per thread, so engines stepping on different threads never share a buffer.
    """
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    key = (rows, cols, dtype)
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(rows, cols, dtype=dtype)
    return buf
