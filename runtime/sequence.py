"""Request and sequence state: token ids, block table, progress and timings."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from edgellm.outputs import RequestMetrics, TokenLogprob
from edgellm.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: a request's prompt plus one sample's output.

    ``num_computed_tokens`` catches up to ``num_tokens`` step by step (chunked prefill, then one token
    per decode); when it does, the sequence samples its next token. Preemption resets it to 0.
    """

    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks, by index
    num_registered_blocks: int = 0  # leading full blocks the prefix cache has already seen
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: Any = None  # torch.Generator for seeded sampling
    detokenizer: Any = None
    logprobs: list[TokenLogprob] | None = None
    num_preemptions: int = 0
    # speculative decoding: the drafts proposed for the next step, and the proposer's own state
    spec_token_ids: list[int] = field(default_factory=list)
    draft_state: Any = None
    # what the last step added, for streaming
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def sort_key(self) -> tuple:
        """Lower runs first: priority, then arrival, then creation order."""
        return (self.request.priority, self.request.metrics.arrival_time, self.seq_id)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    priority: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1 samples split off the first sequence after the prompt was computed
    max_tokens: int = 0  # params.max_tokens capped by the context length

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.is_finished for s in self.seqs) and (
            self.forked or self.params.n == 1 or self.seqs[0].finish_reason == "abort"
        )

    @property
    def num_cached_tokens(self) -> int:
        return self.seqs[0].num_cached_tokens if self.seqs else 0
