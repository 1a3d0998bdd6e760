"""Turn one step's logits into one token per sequence, for the whole batch at once.

Order of work, as in vLLM v1: logit bias and the ``min_tokens`` mask, then the repetition / presence /
frequency penalties; greedy rows take the argmax of that; random rows are scaled by their temperature
and truncated by ``min_p``, ``top_k`` and ``top_p`` (each on what the one before kept), then draw by
inverse CDF from one uniform number per row. Logprobs always describe the raw model distribution.

Sampling by inverse CDF needs a single random number per row, so a seeded row draws exactly one number
from its own generator each step, and it samples over a token order that depends on nothing but its own
probabilities (probability descending, then token id): the same seed gives the same tokens whatever else
shares the batch.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from edgellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The first top-k tried when a row's top-p or min-p set has an unknown size; rows whose set turns out to
# be larger are retried with a top-k this many times bigger, up to the whole vocabulary.
_FIRST_CANDIDATES = 64
_CANDIDATE_GROWTH = 8


@dataclass
class SamplingRow:
    """One row of the logits: a sequence that samples a token this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before this step
    generator: torch.Generator | None = None  # the sequence's own, when ``params.seed`` is set


@dataclass
class SampledToken:
    """The token chosen for one row, with its raw logprob and the best alternatives when asked for."""

    token_id: int
    logprob: float | None = None  # of the chosen token, when ``params.logprobs`` is set
    top: list[tuple[int, float]] = field(default_factory=list)  # ``params.logprobs`` best, best first


def _flat_positions(
    row_lists: Sequence[Sequence[int]], row_index: Sequence[int], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every in-vocabulary token of every ``row_lists[j]``: its flat position in the logits,
    ``row_index[j] * vocab_size + token``, and ``j``."""
    # numpy reads a list of ints about 8x faster than torch.tensor does
    lengths = np.fromiter((len(ids) for ids in row_lists), dtype=np.int64, count=len(row_lists))
    tokens = np.fromiter(itertools.chain.from_iterable(row_lists), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(len(row_lists), dtype=np.int64), lengths)
    keep = (tokens >= 0) & (tokens < vocab_size)
    owner, tokens = owner[keep], tokens[keep]
    at = np.asarray(row_index, dtype=np.int64)[owner] * vocab_size + tokens
    return torch.from_numpy(at).to(device), torch.from_numpy(owner).to(device)


class Sampler:
    """Batched logit processing and sampling: one call per engine step for every sampling sequence.

    ``vocab_size`` is the tokenizer's vocabulary; logit columns past it (padding in the model's output
    layer) are never sampled. ``eos_token_ids`` are masked while a row is below its ``min_tokens``
    (unless it ignores eos), together with the row's ``stop_token_ids``.

    >>> import torch
    >>> from edgellm.sampling_params import SamplingParams
    >>> sampler = Sampler(vocab_size=4, eos_token_ids=[3])
    >>> logits = torch.tensor([[0.0, 2.0, 1.0, 5.0]])
    >>> row = SamplingRow(SamplingParams(temperature=0, min_tokens=1, logprobs=1), [0], [], None)
    >>> out = sampler(logits, [row])[0]
    >>> out.token_id, out.top[0][0]
    (1, 3)
    """

    def __init__(self, vocab_size: int, eos_token_ids: list[int]):
        assert vocab_size > 0
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        if not rows:
            return []
        vocab = min(self.vocab_size, logits.shape[1])
        raw = logits[:, :vocab]
        if raw.dtype != torch.float32:
            raw = raw.float()

        processed = self._process(raw, rows)
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows):
            token_ids = processed.max(dim=-1).indices
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=raw.device)
            if greedy:
                picked = torch.tensor(greedy, device=raw.device)
                token_ids[picked] = processed[picked].max(dim=-1).indices
            random = [i for i, row in enumerate(rows) if not row.params.greedy]
            sampled = self._sample(processed, rows, random, owned=processed is not raw)
            token_ids[torch.tensor(random, device=raw.device)] = sampled

        chosen = token_ids.tolist()
        wants = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if not wants:
            return [SampledToken(t) for t in chosen]
        return self._with_logprobs(raw, rows, wants, token_ids, chosen)

    # -- logit processing: bias, min_tokens, penalties -------------------------------------------------

    def _process(self, raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Apply every row's logit edits; returns ``raw`` itself when no row has any."""
        bias_pos: list[int] = []
        bias_val: list[float] = []
        banned: list[int] = []
        penalised: list[int] = []
        vocab = raw.shape[1]
        for i, row in enumerate(rows):
            p = row.params
            if p.logit_bias:
                for token, bias in p.logit_bias.items():
                    if 0 <= token < vocab:
                        bias_pos.append(i * vocab + token)
                        bias_val.append(float(bias))
            if len(row.output_token_ids) < p.min_tokens:
                stops = p.stop_token_ids if p.ignore_eos else [*self.eos_token_ids, *p.stop_token_ids]
                banned.extend(i * vocab + t for t in stops if 0 <= t < vocab)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                penalised.append(i)
        if not (bias_pos or banned or penalised):
            return raw

        logits = raw.clone(memory_format=torch.contiguous_format)
        flat = logits.view(-1)
        device = logits.device
        if bias_pos:
            flat.index_add_(0, torch.tensor(bias_pos, device=device), torch.tensor(bias_val, device=device))
        if banned:
            flat[torch.tensor(banned, device=device)] = float("-inf")
        if penalised:
            self._penalise(logits, [rows[i] for i in penalised], penalised)
        return logits

    @staticmethod
    def _penalise(logits: torch.Tensor, rows: Sequence[SamplingRow], where: list[int]) -> None:
        """Repetition penalty over prompt + output (HF/vLLM), presence and frequency over output (OpenAI).

        Only the logits of tokens already seen change, so this gathers and scatters those alone
        instead of building ``[rows, vocab]`` masks. A token listed twice is gathered twice from the
        same value and written back twice with the same result, so duplicates need no ``unique``.
        """
        vocab, device, dtype = logits.shape[1], logits.device, logits.dtype
        flat = logits.view(-1)

        def per_row(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        rep = [(i, r) for i, r in zip(where, rows) if r.params.repetition_penalty != 1.0]
        if rep:
            lists = [r.prompt_token_ids for _, r in rep] + [r.output_token_ids for _, r in rep]
            at, owner = _flat_positions(lists, [i for i, _ in rep] * 2, vocab, device)
            penalty = per_row([r.params.repetition_penalty for _, r in rep] * 2)[owner]
            seen = flat[at]
            # a penalty > 1 makes a seen token less likely whichever its sign
            flat[at] = torch.where(seen > 0, seen / penalty, seen * penalty)
        counted = [(i, r) for i, r in zip(where, rows)
                   if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
        if counted:
            at, owner = _flat_positions([r.output_token_ids for _, r in counted], [i for i, _ in counted],
                                        vocab, device)
            flat[at] = flat[at] - per_row([r.params.presence_penalty for _, r in counted])[owner]
            flat.index_add_(0, at, -per_row([r.params.frequency_penalty for _, r in counted])[owner])

    # -- random sampling -------------------------------------------------------------------------------

    def _sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], which: list[int], owned: bool
    ) -> torch.Tensor:
        """Token ids for the rows ``which`` (all non-greedy), in that order. ``owned``: ``logits`` is
        this call's own copy and may be overwritten."""
        device = logits.device
        if len(which) < logits.shape[0]:
            sub, owned = logits[torch.tensor(which, device=device)], True
        else:
            sub = logits
        params = [rows[i].params for i in which]
        if any(p.temperature != 1.0 for p in params):
            temperature = torch.tensor([p.temperature for p in params], dtype=sub.dtype, device=device)
            sub = sub.div_(temperature.unsqueeze(1)) if owned else sub / temperature.unsqueeze(1)
        probs = torch.softmax(sub, dim=-1)
        uniform = self._uniforms([rows[i] for i in which], device)

        truncated = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0]
        plain = [j for j, p in enumerate(params) if not (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)]
        out = torch.empty(len(which), dtype=torch.long, device=device)
        if plain:
            idx = torch.tensor(plain, device=device)
            part = probs if len(plain) == len(which) else probs[idx]
            out[idx] = _inverse_cdf(part, uniform[idx])
        if truncated:
            idx = torch.tensor(truncated, device=device)
            part = probs if len(truncated) == len(which) else probs[idx]
            out[idx] = _sample_truncated(part, [params[j] for j in truncated], uniform[idx])
        return out

    @staticmethod
    def _uniforms(rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
        """One number in (0, 1] per row: seeded rows from their own generator, the rest in one draw."""
        uniform = torch.rand(len(rows), device=device)
        seeded = [(j, r.generator) for j, r in enumerate(rows) if r.generator is not None]
        if seeded:
            own = [torch.rand(1, generator=g, device=g.device).item() for _, g in seeded]
            uniform[torch.tensor([j for j, _ in seeded], device=device)] = torch.tensor(own, device=device)
        # 1 - u lies in (0, 1]: a zero would select a token of probability zero
        return 1.0 - uniform

    # -- logprobs --------------------------------------------------------------------------------------

    @staticmethod
    def _with_logprobs(
        raw: torch.Tensor,
        rows: Sequence[SamplingRow],
        wants: list[int],
        token_ids: torch.Tensor,
        chosen: list[int],
    ) -> list[SampledToken]:
        device = raw.device
        idx = torch.tensor(wants, device=device)
        logprobs = torch.log_softmax(raw if len(wants) == raw.shape[0] else raw[idx], dim=-1)
        mine = logprobs.gather(1, token_ids[idx].unsqueeze(1)).squeeze(1).tolist()
        most = max(rows[i].params.logprobs or 0 for i in wants)
        if most:
            top_vals, top_ids = logprobs.topk(min(most, logprobs.shape[1]), dim=-1)
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
        result = [SampledToken(t) for t in chosen]
        for k, i in enumerate(wants):
            n = rows[i].params.logprobs or 0
            result[i].logprob = mine[k]
            if n:
                result[i].top = list(zip(top_ids_l[k][:n], top_vals_l[k][:n]))
        return result


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first column whose running probability reaches ``uniform * total``.

    ``uniform`` is in (0, 1], so a column of probability zero is never the first to reach it.
    """
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, target).squeeze(1)
    return picked.clamp_(max=probs.shape[1] - 1)


def _sample_truncated(probs: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """Sample rows under min-p, then top-k, then top-p, looking only at each row's best candidates.

    A row's kept set is every token whose probability reaches its threshold, so it depends on the
    values alone; a row whose kept set might reach past the candidates looked at is retried with more.
    """
    device = probs.device
    n, vocab = probs.shape
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
    has_top_k = torch.tensor([p.top_k > 0 for p in params], device=device)

    # the mass top-p measures, for rows without a top-k: everything min-p keeps
    if any(p.min_p > 0.0 for p in params):
        min_p_floor = min_p * probs.max(dim=-1).values
        full_mass = (probs * (probs >= min_p_floor.unsqueeze(1))).sum(dim=-1)
    else:
        min_p_floor = torch.zeros(n, dtype=probs.dtype, device=device)
        full_mass = torch.ones(n, dtype=probs.dtype, device=device)  # a softmax

    out = torch.empty(n, dtype=torch.long, device=device)
    pending = torch.arange(n, device=device)
    want = max([p.top_k + 1 for p in params if p.top_k > 0] or [_FIRST_CANDIDATES])
    width = min(vocab, max(want, _FIRST_CANDIDATES))
    while pending.numel():
        rows = probs[pending] if pending.numel() < n else probs
        values, ids = rows.topk(width, dim=-1)
        threshold = _thresholds(
            values, top_k[pending], has_top_k[pending], top_p[pending], min_p_floor[pending], full_mass[pending]
        )
        last = values[:, -1]
        done = (last < threshold) | (last <= 0) if width < vocab else torch.ones_like(last, dtype=torch.bool)
        if done.any():
            finished = done.nonzero().squeeze(1)
            out[pending[finished]] = _sample_candidates(
                values[finished], ids[finished], threshold[finished], uniform[pending[finished]]
            )
        pending = pending[~done]
        width = min(vocab, width * _CANDIDATE_GROWTH)
    return out


def _thresholds(
    values: torch.Tensor,
    top_k: torch.Tensor,
    has_top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p_floor: torch.Tensor,
    full_mass: torch.Tensor,
) -> torch.Tensor:
    """Per row, the lowest probability kept, from candidates sorted best first."""
    width = values.shape[1]
    kth = values.gather(1, (top_k.clamp(max=width) - 1).unsqueeze(1)).squeeze(1)
    k_floor = torch.where(has_top_k, kth, 0.0)
    floor = torch.maximum(min_p_floor, k_floor)
    kept = values * (values >= floor.unsqueeze(1))
    mass = torch.where(has_top_k, kept.sum(dim=-1), full_mass)
    before = kept.cumsum(dim=-1) - kept
    # top-p keeps the best tokens until their mass reaches top_p; the best one always stays
    n_keep = ((before < (top_p * mass).unsqueeze(1)) & (kept > 0)).sum(dim=-1).clamp(min=1)
    p_floor = torch.where(top_p < 1.0, values.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1), 0.0)
    return torch.maximum(floor, p_floor)


def _sample_candidates(
    values: torch.Tensor, ids: torch.Tensor, threshold: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF sample among candidates at or above ``threshold``, walked in token-id order.

    Id order (not probability order) keeps a seeded draw stable when the logits move by rounding
    noise (another kernel path for a bigger batch): a near-tie that swaps two candidates' ranks
    would otherwise shift every later boundary of the running sum.
    """
    ids, order = ids.sort(dim=-1)
    values = values.gather(1, order)
    kept = values * (values >= threshold.unsqueeze(1))
    return ids.gather(1, _inverse_cdf(kept, uniform).unsqueeze(1)).squeeze(1)
