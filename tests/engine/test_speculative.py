"""Speculative decoding by prompt lookup on the real model: the drafts change how many steps a
request takes, never what a greedy request says."""
from __future__ import annotations

import pytest

from edgellm import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUOTE = ("Repeat this list exactly, then say done: red apple, green pear, yellow banana, purple plum, "
         "orange mango, red apple, green pear, yellow banana.")
PROMPTS = [QUOTE, "Count from one to twenty in words, separated by commas.",
           "Write a short story about a robot learning to paint."]


@pytest.fixture(scope="module")
def fp32_spec_llm(smollm2_gguf):
    return LLM(str(smollm2_gguf), weights="dequantize", dtype="float32", device="cpu", num_speculative_tokens=4)


@pytest.fixture(scope="module")
def q4_spec_llm(smollm2_gguf):
    return LLM(str(smollm2_gguf), device="cpu", num_speculative_tokens=4)


def _chat(llm, params):
    return llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)


def test_greedy_output_is_the_models_own_in_float32(fp32_llm, fp32_spec_llm):
    """Float32 arithmetic gives a verified row the same logits as decoding it alone, so the tokens
    are the same as without drafts, and many drafts are accepted."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    before = fp32_spec_llm.engine.stats()
    spec = _chat(fp32_spec_llm, params)
    after = fp32_spec_llm.engine.stats()
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in _chat(fp32_llm, params)]
    drafted = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    assert drafted > 0 and 0 < accepted <= drafted
    assert all(len(o.outputs[0].token_ids) == 64 for o in spec)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),  # the length falls inside a verified run
    SamplingParams(temperature=0, max_tokens=64, stop=["banana"]),
    SamplingParams(temperature=0, max_tokens=64),  # stops at EOS
    SamplingParams(temperature=0, max_tokens=40, min_tokens=30),
], ids=["length", "stop-string", "eos", "min-tokens"])
def test_stops_inside_accepted_drafts_are_where_they_would_be_without(fp32_llm, fp32_spec_llm, params):
    want = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in _chat(fp32_llm, params)]
    got = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
           for o in _chat(fp32_spec_llm, params)]
    assert got == want


def test_sampled_and_logprob_requests_decode_as_before_beside_drafting_ones(fp32_llm, fp32_spec_llm):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24)
    with_logprobs = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [[{"role": "user", "content": p}] for p in (QUOTE, PROMPTS[1], QUOTE)]
    params = [greedy, seeded, with_logprobs]

    def run(llm):
        return [(o.outputs[0].token_ids, [(t.token_id, round(t.logprob, 4)) for t in o.outputs[0].logprobs or []])
                for o in llm.chat(prompts, params)]

    assert run(fp32_spec_llm) == run(fp32_llm)


def test_packed_weights_stay_close_to_decoding_without_drafts(q4_llm, q4_spec_llm):
    """The packed model's multi-row steps take other kernels than one-row decodes (bf16 tiles), so a
    near-tie may flip late in an answer; it must start the same way and run to its length."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in _chat(q4_llm, params)]
    spec = [o.outputs[0].token_ids for o in _chat(q4_spec_llm, params)]
    assert all(len(s) == 48 for s in spec)
    assert all(s[:8] == p[:8] for s, p in zip(spec, plain))
    assert q4_spec_llm.engine.stats().spec_accepted_tokens > 0


def test_bad_speculative_settings_name_the_option(smollm2_gguf):
    with pytest.raises(ValueError, match="prompt_lookup"):
        LLM(str(smollm2_gguf), num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2)
