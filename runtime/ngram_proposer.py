"""Draft tokens for speculative decoding by prompt lookup (n-gram matching), as vLLM's ``ngram`` method.

A sequence's last ``n`` tokens (``n`` from ``max_n`` down to ``min_n``) are looked up among its
earlier tokens, prompt and output alike; where they occurred before, the tokens that followed that
occurrence are the drafts. Chats that quote their prompt (code edits, summaries, extraction) and text
that repeats itself match often; the model verifies every draft in one step with the token it feeds
back, so a draft only costs a row of that step, and each accepted one saves a whole step.

Each sequence keeps an index of its n-grams, filled in as tokens arrive (each position is indexed
once), so a proposal is a few dictionary lookups whatever the context length.

Example::

    proposer = NgramProposer(num_tokens=4, min_n=2, max_n=4)
    drafts = proposer.propose(seq, limit=4)  # [] when the last tokens never occurred before
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.sequence import Sequence


@dataclass
class NgramIndex:
    """For each n-gram of a sequence's tokens, the position just past its latest occurrence, over
    the occurrences that end before the last token (the one being matched is never its own hit)."""

    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending at positions up to this one (exclusive end) are in ``ends``

    def catch_up(self, tokens: list[int], upto: int, min_n: int, max_n: int) -> None:
        ends = self.ends
        for end in range(max(self.indexed + 1, min_n), upto + 1):
            for n in range(min_n, min(max_n, end) + 1):
                ends[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, upto)


class NgramProposer:
    """Proposes up to ``num_tokens`` drafts a step from a sequence's own earlier text."""

    def __init__(self, num_tokens: int, min_n: int = 2, max_n: int = 4) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {num_tokens}")
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n} and {max_n}")
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose(self, seq: Sequence, limit: int | None = None) -> list[int]:
        """Drafts to follow ``seq``'s tokens (at most ``limit``), or [] where nothing matches."""
        k = self.num_tokens if limit is None else min(self.num_tokens, limit)
        tokens = seq.token_ids
        length = len(tokens)
        if k <= 0 or length <= self.min_n:
            return []
        index = seq.draft_state
        if index is None:
            index = seq.draft_state = NgramIndex()
        index.catch_up(tokens, length - 1, self.min_n, self.max_n)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = index.ends.get(tuple(tokens[length - n:]))
            if end is not None:
                return tokens[end:end + k]
        return []
