"""Speculative decoding by prompt lookup on the real model: the drafts change how many steps a
request takes, never what a greedy request says."""
from __future__ import annotations

import logging

import pytest

from edgellm import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUOTE = ("Repeat this list exactly, then say done: red apple, green pear, yellow banana, purple plum, "
         "orange mango, red apple, green pear, yellow banana.")
PROMPTS = [QUOTE, "Count from one to twenty in words, separated by commas.",
           "Write a short story about a robot learning to paint."]


@pytest.fixture(scope="module")
def fp32_plain(smollm2_gguf):
    return LLM(str(smollm2_gguf), weights="dequantize", dtype="float32", device="cpu", num_speculative_tokens=0)


@pytest.fixture(scope="module")
def fp32_spec(smollm2_gguf):
    """Four drafts a step however many sequences run."""
    return LLM(str(smollm2_gguf), weights="dequantize", dtype="float32", device="cpu", num_speculative_tokens=4,
               speculative_max_seqs=64)


@pytest.fixture(scope="module")
def q4_plain(smollm2_gguf):
    return LLM(str(smollm2_gguf), device="cpu", num_speculative_tokens=0)


def _chat(llm, params, prompts=PROMPTS):
    return llm.chat([[{"role": "user", "content": p}] for p in prompts], params)


def _drafts(llm, run):
    before = llm.engine.stats()
    out = run()
    after = llm.engine.stats()
    return out, after.spec_draft_tokens - before.spec_draft_tokens, after.spec_accepted_tokens - before.spec_accepted_tokens


def test_greedy_output_is_the_models_own_in_float32(fp32_plain, fp32_spec):
    """Float32 arithmetic gives a verified row the same logits as decoding it alone, so the tokens
    are the same as without drafts, and many drafts are accepted."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    spec, drafted, accepted = _drafts(fp32_spec, lambda: _chat(fp32_spec, params))
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in _chat(fp32_plain, params)]
    assert drafted > 0 and 0 < accepted <= drafted
    assert all(len(o.outputs[0].token_ids) == 64 for o in spec)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),  # the length falls inside a verified run
    SamplingParams(temperature=0, max_tokens=64, stop=["banana"]),
    SamplingParams(temperature=0, max_tokens=64),  # stops at EOS
    SamplingParams(temperature=0, max_tokens=40, min_tokens=30),
], ids=["length", "stop-string", "eos", "min-tokens"])
def test_stops_inside_accepted_drafts_are_where_they_would_be_without(fp32_plain, fp32_spec, params):
    def run(llm):
        return [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in _chat(llm, params)]

    assert run(fp32_spec) == run(fp32_plain)


def test_sampled_and_logprob_requests_decode_as_before_beside_drafting_ones(fp32_plain, fp32_spec):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24)
    with_logprobs = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [[{"role": "user", "content": p}] for p in (QUOTE, PROMPTS[1], QUOTE)]
    params = [greedy, seeded, with_logprobs]

    def run(llm):
        return [(o.outputs[0].token_ids, [(t.token_id, round(t.logprob, 4)) for t in o.outputs[0].logprobs or []])
                for o in llm.chat(prompts, params)]

    assert run(fp32_spec) == run(fp32_plain)


def test_packed_weights_by_default_draft_for_one_stream_and_say_the_same(q4_llm, q4_plain):
    """Where decode steps run in one region (AMX or AVX512-BF16, 2+ threads) the engine drafts by
    itself while at most two sequences run, and a verified row's arithmetic is that of decoding it
    alone, so one greedy stream says exactly what it says without drafts; three streams draft
    nothing. Elsewhere nothing drafts unasked."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    engine = q4_llm.engine
    caps = engine.backend.capabilities()
    alone, drafted, accepted = _drafts(q4_llm, lambda: _chat(q4_llm, params, PROMPTS[:1]))
    if not caps.speculative_tokens:  # op-by-op decode steps: verified rows would be prompt tiles
        assert engine.proposer is None and drafted == 0
        return
    assert engine.proposer.num_tokens == caps.speculative_tokens and engine.spec_max_seqs == caps.speculative_max_seqs
    assert alone[0].outputs[0].token_ids == _chat(q4_plain, params, PROMPTS[:1])[0].outputs[0].token_ids
    assert 0 < accepted <= drafted
    _, drafted, _ = _drafts(q4_llm, lambda: _chat(q4_llm, params))
    assert drafted == 0


def test_packed_weights_with_many_rows_stay_close_to_decoding_without_drafts(smollm2_gguf, q4_plain):
    """Past ``int4_gemv``'s rows a step's matmuls run on other kernels (bf16 tiles) as its row count
    changes, so a near-tie may flip late in an answer; it must start the same way."""
    llm = LLM(str(smollm2_gguf), device="cpu", num_speculative_tokens=4, speculative_max_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    spec, drafted, accepted = _drafts(llm, lambda: _chat(llm, params))
    plain = [o.outputs[0].token_ids for o in _chat(q4_plain, params)]
    assert all(len(o.outputs[0].token_ids) == 48 for o in spec) and 0 < accepted <= drafted
    assert all(o.outputs[0].token_ids[:8] == p[:8] for o, p in zip(spec, plain))


def test_batch_invariant_mode_never_drafts(smollm2_gguf, caplog):
    with caplog.at_level(logging.WARNING, logger="edgellm.engine"):
        llm = LLM(str(smollm2_gguf), device="cpu", batch_invariant=True, num_speculative_tokens=3)
    assert llm.engine.proposer is None and "batch-invariant" in caplog.text


@pytest.mark.parametrize("opts, match", [({"num_speculative_tokens": 2, "prompt_lookup_min": 3,
                                           "prompt_lookup_max": 2}, "prompt_lookup"),
                                         ({"speculative_max_seqs": 0}, "speculative_max_seqs")])
def test_bad_speculative_settings_name_the_option(smollm2_gguf, opts, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(smollm2_gguf), **opts)
