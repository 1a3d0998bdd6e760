"""Continuous batching under one per-step token budget.

There are no prefill and decode phases: every running sequence asks for the tokens it has not yet
computed (a whole prompt chunk, or the one token sampled last step) and the scheduler hands out the
step's token budget, running sequences first, then waiting ones in priority order. When the KV pool
runs dry the lowest-priority running sequence is preempted: its blocks are freed and it is recomputed
later (its prefix will often still be cached), so no request is ever lost.

Speculative decoding: a decoding sequence may carry draft tokens (``Sequence.spec_token_ids``) to
verify with the token it feeds back, as more rows of the same step. Drafts take what is left of the
budget after the token itself and are the first thing dropped when the pool is short; after the
step the engine tells ``update_after_step`` how many were accepted, and the cache slots of the rest
are simply written over later (they are never counted as computed, so never hashed for reuse).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

from edgellm.kv_cache import BlockManager
from edgellm.sequence import SeqStatus, Sequence

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it this step (drafts included)
    samples: bool  # this step completes the sequence's known tokens, so it samples the next one
    drafts: list[int] = field(default_factory=list)  # speculative tokens verified after the known ones


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        assert max_num_seqs > 0 and max_num_batched_tokens > 0
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # kept sorted by sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample joins its parent in the running set (its blocks are already shared)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0, "a running sequence always has a token to compute"
            drafts = seq.spec_token_ids[:budget - n] if seq.num_computed_tokens + n == seq.num_tokens else []
            copies = self.bm.allocate_slots(seq, n + len(drafts))
            if copies is None and drafts:
                drafts, copies = [], self.bm.allocate_slots(seq, n)
            while copies is None:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                copies = self.bm.allocate_slots(seq, n)
            if copies is None:
                break
            samples = seq.num_computed_tokens + n == seq.num_tokens
            out.scheduled.append(ScheduledSeq(seq, n + len(drafts), samples, drafts))
            out.copies.extend(copies)
            budget -= n + len(drafts)
            i += 1

        # admit new work only if nothing had to make room this step (or it would thrash)
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            first_admission = seq.num_preemptions == 0 and seq.num_output_tokens == 0
            hit = self.bm.allocate_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = self.bm.allocate_slots(seq, n)
            if copies is None:
                self.bm.free_seq(seq)  # give back the prefix blocks; try again next step
                break
            if first_admission:
                seq.num_cached_tokens = hit
                self.bm.record_prefix_lookup(seq.num_prompt_tokens, hit)
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
            out.copies.extend(copies)
            budget -= n
        # sequences feeding back generated tokens first (stable): backends pick kernels by token kind,
        # and the engine reads sampled rows in this same order
        out.scheduled.sort(key=lambda s: s.seq.num_computed_tokens < s.seq.num_prompt_tokens)
        return out

    def update_after_step(self, out: SchedulerOutput, accepted: dict[int, int] | None = None) -> None:
        """Advance each scheduled sequence past the tokens the model just computed: for one that
        verified drafts, the token it fed back and the ``accepted[seq_id]`` drafts that held."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_tokens - len(s.drafts) + (
                accepted.get(s.seq.seq_id, 0) if s.drafts and accepted else 0)
            self.bm.register_computed(s.seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        logger.debug("preempted seq %d (recompute %d tokens later)", seq.seq_id, seq.num_tokens)
        self.add(seq)
