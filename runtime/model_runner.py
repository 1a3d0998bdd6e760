"""Turns a scheduled batch into flat tensors, runs the model, and returns logits for the samplers
(or, when every sampled row is greedy and takes nothing else from the head, their tokens)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from edgellm.backends.base import AttentionMetadata, Backend
from edgellm.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

# Blocks made resident ahead of the pool's high-water mark at a time (1024 tokens at block size 16;
# ~23 MB for SmolLM2-135M): pages faulted in bulk cost ~1.5 us each, one by one inside a step's
# kernels far more (32 concurrent chats: 553-584 -> 607-627 output tokens/s).
RESIDENT_AHEAD = 64
# Blocks paged in per call while the engine is idle (``page_in_idle``): ~3 MB for SmolLM2-135M,
# 2-8 ms on a VM whose host backs fresh memory at 0.4-1.5 GB/s, so a request that arrives meanwhile
# waits at most that long.
IDLE_PAGE_IN = 8


@dataclass
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states whose next token is sampled (or verified)
    every_row: bool = False  # logits_indices is every row in order (a step of decodes): no gather


@dataclass
class StepLogits:
    """A step's head output for the samplers: float32 ``logits [rows, vocab]`` on the CPU, or, in a
    step whose every sampled row only takes the argmax, ``greedy [rows]`` token ids and no logits."""
    logits: torch.Tensor | None = None
    greedy: torch.Tensor | None = None


def _wants_invariance(params) -> bool:
    """A seeded sampling request must draw the same tokens whatever else is in the batch."""
    return params.seed is not None and params.temperature > 0


def _argmax_only(s) -> bool:
    """Whether only the argmax of this row's logits is used: greedy, no logprobs, nothing edits them."""
    p = s.seq.request.params
    return p.argmax_only and s.seq.num_output_tokens >= p.min_tokens


class ModelRunner:
    def __init__(self, model, backend: Backend, kv_caches: list[torch.Tensor], block_size: int,
                 vocab_size: int | None = None) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.vocab_size = vocab_size  # the sampler's columns; known, argmax-only steps may say so
        self.num_blocks = kv_caches[0].shape[1] if kv_caches else 0
        self._resident = 0  # blocks below this are resident (populate_kv)

    def ensure_resident(self, high_water: int) -> None:
        """Populate the cache pages of blocks up to ``high_water`` and ``RESIDENT_AHEAD`` more, so
        steps do not fault pages in one at a time inside the kernels."""
        if high_water > self._resident:
            self._populate_to(high_water + RESIDENT_AHEAD)

    def _populate_to(self, end: int) -> None:
        end = min(self.num_blocks, end)
        self.backend.populate_kv(self.kv_caches, self._resident, end)
        self._resident = end

    @property
    def fully_resident(self) -> bool:
        return self._resident >= self.num_blocks

    def page_in_idle(self) -> bool:
        """Make the next ``IDLE_PAGE_IN`` blocks resident; True while more of the pool is left."""
        if not self.fully_resident:
            self._populate_to(self._resident + IDLE_PAGE_IN)
        return not self.fully_resident

    def prepare(self, sched: SchedulerOutput) -> ModelInput:
        num_decode = 0  # the scheduler lists sequences feeding back generated tokens first
        for s in sched.scheduled:
            if s.seq.num_computed_tokens < s.seq.num_prompt_tokens:
                break
            num_decode += s.num_tokens
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, seq_lens, logits_idx = [0], [], []
        max_blocks = 0
        for s in sched.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            if s.num_tokens == 1:  # a decode: plain ints (numpy's per-call cost was ~8 us a row)
                ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:end - len(s.drafts)])
                ids.extend(s.drafts)  # verified after the known tokens, each row predicting the next
                pos = np.arange(start, end, dtype=np.int64)
                table = np.asarray(seq.block_table, dtype=np.int64)
                positions.extend(pos.tolist())
                slots.extend((table[pos // bs] * bs + pos % bs).tolist())
            qsl.append(qsl[-1] + s.num_tokens)
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(seq.block_table))
            if s.samples:
                logits_idx.extend(range(qsl[-1] - 1 - len(s.drafts), qsl[-1]))
        tables = np.zeros((len(seq_lens), max(max_blocks, 1)), dtype=np.int32)
        for i, s in enumerate(sched.scheduled):
            tables[i, : len(s.seq.block_table)] = s.seq.block_table
        dev = self.backend.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tables).to(dev),
            block_size=bs,
            max_query_len=max(s.num_tokens for s in sched.scheduled),
            max_seq_len=max(seq_lens),
            num_decode_tokens=num_decode,
            batch_invariant=any(_wants_invariance(s.seq.request.params) for s in sched.scheduled),
            query_start_loc_list=qsl,
            seq_lens_list=seq_lens,
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64, device=dev),
            every_row=len(logits_idx) == len(ids),  # increasing row numbers below len(ids): all of them
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepLogits:
        """Run one step; return its logits, or its greedy tokens when those are all the rows take."""
        if sched.copies:
            self.backend.copy_blocks(self.kv_caches, sched.copies)
        inp = self.prepare(sched)
        self.backend.begin_step(inp.meta)
        hidden = self.model.forward(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
        if inp.logits_indices.numel() == 0:
            return StepLogits(logits=torch.empty(0, 0))
        if not inp.every_row:  # a gather costs ~0.1 ms after a step's kernels have left the caches cold
            hidden = hidden[inp.logits_indices]
        if self.vocab_size is not None and all(_argmax_only(s) for s in sched.scheduled if s.samples):
            return StepLogits(greedy=self.model.compute_greedy(hidden, self.vocab_size).cpu())
        return StepLogits(logits=self.model.compute_logits(hidden).float().cpu())
