"""Fake requests for testing the scheduler and block manager with no model at all."""
from __future__ import annotations

import itertools

from edgellm.outputs import RequestMetrics
from edgellm.sampling_params import SamplingParams
from edgellm.sequence import Request, Sequence

_clock = itertools.count()


def make_seq(tokens: list[int] | int, priority: int = 0, rid: str | None = None) -> Sequence:
    ids = list(range(tokens)) if isinstance(tokens, int) else list(tokens)
    req = Request(rid or f"r{next(_clock)}", None, ids, SamplingParams(max_tokens=10**6),
                  RequestMetrics(float(next(_clock))), priority=priority)
    seq = Sequence(req, 0, list(ids), len(ids))
    req.seqs.append(seq)
    return seq
