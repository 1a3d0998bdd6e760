"""The seam that makes edgellm heterogeneous: every device answers these ops for a flat batch.

Model code calls only these methods and never asks which device it runs on. A new device is a new
``Backend`` subclass (plus its kernels) registered in ``registry.py``.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from edgellm.quant.kv_int8 import row_elements


@dataclass
class Capabilities:
    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    default_dtype: torch.dtype
    kv_cache_bytes_available: int  # memory the KV cache may take without starving the rest
    supports_graphs: bool = False
    native_quant_formats: tuple[str, ...] = ()
    # the engine's default token budget per step (EngineConfig.max_num_batched_tokens unset): how many
    # prompt tokens ride along with the decodes of a step before big steps cost more than they save
    step_tokens: int = 2048
    # speculative decoding the engine turns on by itself (EngineConfig.num_speculative_tokens unset):
    # draft tokens a step for greedy requests, 0 for none; and the most running sequences that still
    # draft (EngineConfig.speculative_max_seqs unset; None: any number), as a verified row costs
    # little next to a small step's weight reads and a share of a big step's arithmetic
    speculative_tokens: int = 0
    speculative_max_seqs: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache; built once per step by the model runner.

    Tokens of all sequences are laid out flat: sequence ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``; those are its *last* tokens, so its context after this
    step is ``seq_lens[i]`` tokens long, found in the blocks listed in ``block_tables[i]``.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    block_size: int
    max_query_len: int
    max_seq_len: int
    # the first rows are generated tokens fed back (decodes), the rest prompt tokens: kernels may treat
    # the two kinds differently (in batch-invariant mode, to keep a token's arithmetic independent of
    # what else is in the batch)
    num_decode_tokens: int = 0
    # this step must use batch-invariant arithmetic (a seeded sampling request is in it)
    batch_invariant: bool = False
    # host copies for kernels and loops that want Python ints
    query_start_loc_list: list[int] = field(default_factory=list)
    seq_lens_list: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class DecoderLayer:
    """One pre-norm block of the Llama family (GQA attention with rotary, then a gated MLP), its
    weights as ``Backend.prepare_weight`` placed them: what ``Backend.decoder_layers`` runs."""

    input_norm: torch.Tensor
    qkv: Any  # q, k and v projections fused by rows
    qkv_bias: torch.Tensor | None
    o_proj: Any
    post_norm: torch.Tensor
    gate_up: Any  # gate and up projections fused by rows
    down: Any
    # what the backend's linear wants for qkv / gate_up: the norms before them produce it directly
    qkv_in: torch.dtype
    gate_up_in: torch.dtype


@dataclass(frozen=True)
class DecoderShape:
    """What every layer of a ``DecoderLayer`` stack shares."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float  # the RMS norms'
    scale: float  # attention's
    sliding_window: int | None = None
    act: str = "silu"


class Backend(ABC):
    """A torch device plus the ops the models need. Subclasses override what they do faster."""

    name = "base"

    def __init__(self, device: str | torch.device = "cpu", threads: int | None = None,
                 batch_invariant: bool | None = None, warmup: bool = True) -> None:
        # warmup: backends with kernels to compile or load do all of them at construction, so the
        # first request runs at full speed; False leaves each to its first use (one-shot commands)
        self.device = torch.device(device)
        self.threads = threads
        # Batch-invariant mode: a token's arithmetic may depend on whether it is a prompt or a
        # generated token, never on the rest of the batch, so outputs are the same alone or batched
        # (at some cost in speed). Off by default, as in vLLM; also $EDGELLM_BATCH_INVARIANT=1.
        if batch_invariant is None:
            batch_invariant = os.environ.get("EDGELLM_BATCH_INVARIANT", "0").lower() in ("1", "true", "yes")
        self.batch_invariant = bool(batch_invariant)

    def warmup(self) -> float:
        """Compile or load every kernel a step can use; return the seconds it took. Backends built with
        ``warmup=False`` may call it later (``edgellm chat`` does, while the user types), but never
        while a step runs. Nothing to do here."""
        return 0.0

    # -- identity and capability --------------------------------------------------------------
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    def step_tokens(self, model: Any, kv_caches: list[torch.Tensor]) -> int:
        """The engine's default token budget a step for this model and cache (``Capabilities.step_tokens``
        unless a backend knows better for them)."""
        return self.capabilities().step_tokens

    def prepare_batching(self, model: Any, kv_caches: list[torch.Tensor], max_num_seqs: int) -> None:  # noqa: B027
        """Optional: ready at start-up what steps of up to ``max_num_seqs`` decodes will read (copies of
        weights built on first use), so that the first busy step does not pay for it."""

    def resolve_dtype(self, dtype: str | torch.dtype) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype in (None, "auto"):
            return self.capabilities().default_dtype
        table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
        if dtype not in table:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(table))}")
        return table[dtype]

    # -- weights ------------------------------------------------------------------------------
    def prepare_weight(self, weight: Any, dtype: torch.dtype, role: str = "linear") -> Any:
        """Place a weight on the device once at load, in the layout this backend's kernels want.

        ``role`` is ``linear``, ``embedding``, ``lm_head`` or ``tied_embedding`` (both at once): a
        backend may pick a different layout for the output head, the largest matmul of a decode step.
        """
        if isinstance(weight, torch.Tensor):
            return weight.to(self.device, dtype)
        return weight

    # -- ops ----------------------------------------------------------------------------------
    @abstractmethod
    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def embedding(self, ids: torch.Tensor, weight: Any, dtype: torch.dtype) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor, weight: Any, argmax_cols: int | None = None) -> torch.Tensor:
        """The output head: float32 ``[T, vocab]`` logits of ``hidden [T, D]``.

        ``argmax_cols=V`` says the caller only takes each row's argmax over the first ``V`` columns
        (greedy rows with nothing that edits logits). A backend may then return the other entries as
        approximations, as long as each row's argmax is the exact logits' argmax.
        """
        return self.linear(hidden, weight).float()

    def greedy_tokens(self, hidden: torch.Tensor, weight: Any, vocab: int) -> torch.Tensor:
        """Each row's argmax over the first ``vocab`` logits of ``hidden [T, D]`` (int64 ``[T]``; the
        first index among equal maxima), for steps that take nothing else from the head."""
        return self.logits(hidden, weight, vocab)[:, :vocab].argmax(dim=-1)

    def linear_input_dtype(self, weight: Any, dtype: torch.dtype) -> torch.dtype:
        """The activation dtype in which ``linear`` takes ``weight``'s input at least cost, for the
        op before it to produce directly (``rms_norm``'s ``out_dtype``). Default: the model's."""
        return dtype

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(norm(x + residual), x + residual)``; with no residual, ``(norm(x), x)``.

        The norm comes in ``out_dtype`` (default ``x``'s); the sum keeps ``residual``'s dtype."""

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                    weight: Any, bias: torch.Tensor | None = None,
                    norm_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(norm, weight, bias), residual)`` for ``norm, residual = rms_norm(x, norm_weight, eps,
        residual, norm_dtype)``: a block's pre-norm and the projection after it, which a backend may do
        in one dispatch (the same numbers as the two ops)."""
        normed, residual = self.rms_norm(x, norm_weight, eps, residual, norm_dtype)
        return self.linear(normed, weight, bias), residual

    def act_linear(self, x: torch.Tensor, act: str, weight: Any) -> torch.Tensor:
        """``linear(act_and_mul(x, act), weight)``: a gated MLP's down projection, which a backend
        may do in one dispatch (the same numbers as the two ops)."""
        return self.linear(self.act_and_mul(x, act), weight)

    @abstractmethod
    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q [T, H, D]`` and ``k [T, Hkv, D]`` (half-split/NeoX layout) by ``cos_sin[pos]``."""

    @abstractmethod
    def act_and_mul(self, x: torch.Tensor, act: str = "silu") -> torch.Tensor:
        """``act(x[..., :d]) * x[..., d:]`` for ``x[..., 2d]``."""

    @abstractmethod
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                  soft_cap: float | None = None) -> torch.Tensor:
        """Write this step's ``k, v [T, Hkv, D]`` into ``kv_cache`` and attend ``q [T, H, D]`` over
        each sequence's whole context, read in place through its block table. Returns ``[T, H, D]``
        in ``v``'s dtype (``rotary`` may have widened ``q`` and ``k``)."""

    def rope_attention(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       positions: torch.Tensor, cos_sin: torch.Tensor, kv_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """Split a fused projection ``qkv [T, (H + 2 Hkv) D]``, ``rotary`` on q and k, then ``attention``.
        Returns ``[T, H * D]``. Backends whose per-op cost matters fuse the three."""
        t = qkv.shape[0]
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q, k = self.rotary(q.reshape(t, num_heads, head_dim), k.reshape(t, num_kv_heads, head_dim), positions,
                           cos_sin)
        o = self.attention(q, k, v.reshape(t, num_kv_heads, head_dim), kv_cache, meta, scale, sliding_window)
        return o.reshape(t, num_heads * head_dim)

    def decoder_layers(self, h: torch.Tensor, layers: list[DecoderLayer], shape: DecoderShape,
                       kv_caches: list[torch.Tensor], positions: torch.Tensor, cos_sin: torch.Tensor,
                       meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``h [T, D]`` (the embeddings) through a stack of Llama-family blocks, layer ``i`` on
        ``kv_caches[i]``. Returns ``(h, residual)`` of the last block, for the final norm to add.

        The ops one by one; a backend whose per-op cost matters runs whole steps in one dispatch
        (the same numbers)."""
        residual = None
        s = shape
        for layer, cache in zip(layers, kv_caches):
            qkv, residual = self.norm_linear(h, layer.input_norm, s.eps, residual, layer.qkv, layer.qkv_bias,
                                             layer.qkv_in)
            o = self.rope_attention(qkv, s.num_heads, s.num_kv_heads, s.head_dim, positions, cos_sin, cache, meta,
                                    s.scale, s.sliding_window)
            h = self.linear(o, layer.o_proj)
            gate_up, residual = self.norm_linear(h, layer.post_norm, s.eps, residual, layer.gate_up, None,
                                                 layer.gate_up_in)
            h = self.act_linear(gate_up, s.act, layer.down)
        return h, residual

    # -- KV cache -----------------------------------------------------------------------------
    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """One tensor per layer, ``[2, num_blocks, num_kv_heads, block_size, head_dim]``; an int8 cache's
        rows carry their scale in 4 more bytes (``quant.kv_int8``).

        Left uninitialised: attention never reads a slot before writing it, and untouched pages of a
        large pool then cost no resident memory (nor the time to zero them at start-up).
        """
        row = row_elements(head_dim, dtype)
        return [torch.empty(2, num_blocks, num_kv_heads, block_size, row, dtype=dtype,
                            device=self.device) for _ in range(num_layers)]

    def populate_kv(self, kv_caches: list[torch.Tensor], start: int, end: int) -> None:  # noqa: B027
        """Make blocks ``start:end`` of every layer's cache resident before steps write them, keeping
        their contents. Optional: device memory is committed when it is allocated."""

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy block ``src`` to ``dst`` in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for cache in kv_caches:
            cache[:, dst] = cache[:, src]

    def begin_step(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Called by the runner before each forward pass; backends may keep per-step facts."""

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype

    def synchronize(self) -> None:  # noqa: B027 - a no-op unless the device runs asynchronously
        """Wait for queued device work (a no-op on synchronous devices such as the CPU)."""
