"""The batched sampler: greedy, truncation, penalties, bias, min_tokens, seeds and logprobs."""
from __future__ import annotations

import pytest
import torch

from edgellm.sampler import Sampler, SamplingRow
from edgellm.sampling_params import SamplingParams

VOCAB = 64
EOS = 2


def row(params: SamplingParams, output: list[int] | None = None, prompt: list[int] | None = None,
        seed: int | None = None) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, prompt or [5, 6, 7], output or [], generator)


def logits_for(n: int, seed: int = 0, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def sample_many(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """``draws`` samples of one row, taken as one batch of identical unseeded rows."""
    batch = logits.expand(draws, -1).contiguous()
    return torch.tensor([t.token_id for t in sampler(batch, [row(params)] * draws)])


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(VOCAB, [EOS])


def test_greedy_is_argmax_and_top_k_1_is_greedy(sampler: Sampler):
    logits = logits_for(16)
    want = logits.argmax(-1).tolist()
    assert [t.token_id for t in sampler(logits, [row(SamplingParams(temperature=0))] * 16)] == want
    assert [t.token_id for t in sampler(logits, [row(SamplingParams(top_k=1))] * 16)] == want
    assert all(t.logprob is None and t.top == [] for t in sampler(logits, [row(SamplingParams(top_k=1))] * 16))


def test_columns_past_the_vocabulary_are_never_sampled():
    sampler = Sampler(VOCAB, [EOS])
    logits = logits_for(4, vocab=VOCAB + 16)
    logits[:, VOCAB:] = 100.0
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0)):
        assert all(t.token_id < VOCAB for t in sampler(logits, [row(params)] * 4))


def test_mixed_batch_keeps_greedy_rows_greedy(sampler: Sampler):
    logits = logits_for(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=1)] * 3
    out = sampler(logits, [row(p, seed=i) for i, p in enumerate(params)])
    for i in (0, 2, 4):
        assert out[i].token_id == logits[i].argmax().item()


def seeded_tokens(sampler: Sampler, target: torch.Tensor, params: SamplingParams, others: list[SamplingRow],
                  others_logits: torch.Tensor, position: int, steps: int = 20) -> list[int]:
    """The tokens one seeded row draws over ``steps`` steps, sharing each batch with ``others``."""
    generator = torch.Generator().manual_seed(1234)
    tokens = []
    for _ in range(steps):
        mine = SamplingRow(params, [1, 2], list(tokens), generator)
        rows = list(others)
        rows.insert(position, mine)
        logits = torch.cat([others_logits[:position], target, others_logits[position:]])
        tokens.append(sampler(logits, rows)[position].token_id)
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9),
    SamplingParams(temperature=1.2, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=10, min_p=0.01, repetition_penalty=1.3, presence_penalty=0.5),
])
def test_seeded_row_reproduces_whatever_the_batch(sampler: Sampler, params: SamplingParams):
    target = logits_for(1, seed=7, scale=1.0)
    alone = seeded_tokens(sampler, target, params, [], target[:0], 0)
    assert len(set(alone)) > 3  # it really samples
    crowd = [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=2.0, top_k=40)),
             row(SamplingParams(top_p=0.5, seed=9), seed=9), row(SamplingParams(frequency_penalty=1.0), [3, 3])]
    crowd_logits = logits_for(4, seed=8)
    for position in (0, 2, 4):
        assert seeded_tokens(sampler, target, params, crowd, crowd_logits, position) == alone
    assert seeded_tokens(sampler, target, params, crowd[::-1], crowd_logits.flip(0), 1) == alone


def test_different_seeds_differ(sampler: Sampler):
    logits = logits_for(1, scale=0.5).expand(40, -1)
    rows = [row(SamplingParams(temperature=1.0, seed=s), seed=s) for s in range(40)]
    assert len({t.token_id for t in sampler(logits, rows)}) > 10


def test_unseeded_rows_follow_the_distribution(sampler: Sampler):
    logits = torch.full((1, VOCAB), -30.0)
    logits[0, [10, 20]] = torch.tensor([0.0, 2.0])  # p(20) = 0.88
    tokens = sample_many(sampler, logits, SamplingParams(temperature=1.0), 4000)
    assert set(tokens.tolist()) == {10, 20}
    assert abs((tokens == 20).float().mean().item() - 0.881) < 0.03


def allowed_by_top_k(logits: torch.Tensor, k: int) -> set[int]:
    return set(logits[0].topk(k).indices.tolist())


def allowed_by_top_p(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> set[int]:
    probs, ids = (logits[0] / temperature).softmax(-1).sort(descending=True)
    before = probs.cumsum(0) - probs
    return set(ids[before < top_p].tolist())


def allowed_by_min_p(logits: torch.Tensor, min_p: float) -> set[int]:
    probs = logits[0].softmax(-1)
    return set((probs >= min_p * probs.max()).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("vocab", [VOCAB, 5000])
def test_truncation_never_leaves_its_set(vocab: int):
    sampler = Sampler(vocab, [EOS])
    logits = logits_for(1, seed=3, vocab=vocab, scale=2.0)
    cases = [
        (SamplingParams(top_k=5), allowed_by_top_k(logits, 5)),
        (SamplingParams(top_p=0.6), allowed_by_top_p(logits, 0.6)),
        (SamplingParams(top_p=0.3, temperature=0.7), allowed_by_top_p(logits, 0.3, 0.7)),
        (SamplingParams(min_p=0.2), allowed_by_min_p(logits, 0.2)),
        (SamplingParams(top_k=8, top_p=0.999), allowed_by_top_k(logits, 8)),
    ]
    for params, allowed in cases:
        seen = set(sample_many(sampler, logits, params, 3000).tolist())
        assert seen <= allowed, params
        if len(allowed) <= 8:
            assert seen == allowed, params  # and it does reach every allowed token


def test_top_p_over_a_flat_distribution_needs_more_candidates():
    vocab = 4096
    sampler = Sampler(vocab, [EOS])
    logits = torch.zeros(1, vocab)
    logits[0, :2048] = 1.0  # the best half holds 73% of the mass
    seen = sample_many(sampler, logits, SamplingParams(top_p=0.7), 2000)
    assert seen.max().item() < 2048
    assert len(set(seen.tolist())) > 500


def test_top_k_and_top_p_per_row_in_one_batch(sampler: Sampler):
    logits = logits_for(1, seed=11).expand(4, -1).contiguous()
    params = [SamplingParams(top_k=2), SamplingParams(top_k=30, top_p=0.5), SamplingParams(temperature=1.0),
              SamplingParams(top_p=0.2)]
    allowed = [allowed_by_top_k(logits, 2), allowed_by_top_k(logits, 30) & allowed_by_top_p(logits, 0.5),
               set(range(VOCAB)), allowed_by_top_p(logits, 0.2)]
    for _ in range(200):
        out = sampler(logits, [row(p) for p in params])
        for tok, ok in zip(out, allowed):
            assert tok.token_id in ok


def test_repetition_penalty_pushes_seen_tokens_down(sampler: Sampler):
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11], logits[0, 12] = 2.0, 1.9, -1.0
    plain = sampler(logits, [row(SamplingParams(temperature=0), output=[10])])[0].token_id
    penalised = sampler(logits, [row(SamplingParams(temperature=0, repetition_penalty=1.2), output=[10])])[0]
    assert (plain, penalised.token_id) == (10, 11)
    # over the prompt too, and a negative logit is multiplied (made more negative)
    rows = [row(SamplingParams(temperature=1.0, repetition_penalty=2.0), prompt=[12])]
    probs_before = logits.softmax(-1)[0, 12]
    processed = sampler._process(logits, rows)
    assert processed[0, 12].item() == pytest.approx(-2.0)
    assert processed[0, 10].item() == pytest.approx(2.0)  # unseen: untouched
    assert processed.softmax(-1)[0, 12] < probs_before


def test_presence_and_frequency_penalties_count_output_only(sampler: Sampler):
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    processed = sampler._process(logits, [row(params, output=[3, 3, 3, 4], prompt=[9])])
    assert processed[0, 3].item() == pytest.approx(-0.5 - 0.75)
    assert processed[0, 4].item() == pytest.approx(-0.5 - 0.25)
    assert processed[0, 9].item() == 0.0  # prompt tokens are not penalised
    # and the greedy choice moves away from a repeated token
    logits[0, 3], logits[0, 4] = 1.0, 0.9
    out = sampler(logits, [row(SamplingParams(temperature=0, frequency_penalty=0.5), output=[3])])
    assert out[0].token_id == 4


def test_penalties_apply_to_their_own_rows_only(sampler: Sampler):
    logits = logits_for(3)
    rows = [row(SamplingParams()), row(SamplingParams(repetition_penalty=1.5), output=[1, 2]), row(SamplingParams())]
    processed = sampler._process(logits, rows)
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])
    assert not torch.equal(processed[1], logits[1])


def test_logit_bias_forces_a_token_and_ignores_bad_ids(sampler: Sampler):
    logits = logits_for(2)
    params = SamplingParams(temperature=1.0, logit_bias={17: 100.0, VOCAB + 5: 100.0, -1: 3.0})
    for _ in range(20):
        assert [t.token_id for t in sampler(logits, [row(params), row(params)])] == [17, 17]
    banned = SamplingParams(temperature=0, logit_bias={int(logits[0].argmax()): -100.0})
    assert sampler(logits[:1], [row(banned)])[0].token_id != logits[0].argmax().item()


def test_min_tokens_masks_eos_and_stop_ids_until_reached(sampler: Sampler):
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 30], logits[0, 8] = 10.0, 9.0, 1.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[30])
    assert sampler(logits, [row(params, output=[1, 1])])[0].token_id == 8
    assert sampler(logits, [row(params, output=[1, 1, 1])])[0].token_id == EOS
    # ignore_eos: eos is not a stop, so min_tokens has no reason to hide it
    ignoring = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sampler(logits, [row(ignoring)])[0].token_id == EOS
    # random rows never draw a masked id either
    tokens = sample_many(sampler, logits, SamplingParams(temperature=5.0, min_tokens=1, stop_token_ids=[30]), 500)
    assert not ({EOS, 30} & set(tokens.tolist()))


def test_logprobs_are_the_raw_distribution(sampler: Sampler):
    logits = logits_for(3)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.5, top_k=3, logprobs=0),
              SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=2)]
    out = sampler(logits, [row(params[0]), row(params[1]), row(params[2], output=[1])])
    raw = logits.log_softmax(-1)
    for i, tok in enumerate(out):
        assert tok.logprob == pytest.approx(raw[i, tok.token_id].item(), abs=1e-5)
    values, ids = raw[0].topk(5)
    assert [t for t, _ in out[0].top] == ids.tolist()
    assert [v for _, v in out[0].top] == pytest.approx(values.tolist(), abs=1e-5)
    assert out[1].top == [] and len(out[2].top) == 2
    assert [v for _, v in out[2].top] == sorted((v for _, v in out[2].top), reverse=True)


def test_logprobs_only_for_rows_that_ask(sampler: Sampler):
    logits = logits_for(2)
    out = sampler(logits, [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=0, logprobs=3))])
    assert out[0].logprob is None and out[0].top == []
    assert out[1].logprob is not None and len(out[1].top) == 3


def test_half_precision_logits_and_empty_batch(sampler: Sampler):
    logits = logits_for(2).to(torch.bfloat16)
    out = sampler(logits, [row(SamplingParams(temperature=0)), row(SamplingParams(top_p=0.9))])
    assert out[0].token_id == logits[0].float().argmax().item()
    assert sampler(torch.empty(0, VOCAB), []) == []
