"""Sampling features end to end on the real model."""
from __future__ import annotations

import pytest

from edgellm import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, a curious cat"


def test_seeded_runs_reproduce_whatever_else_runs(q4_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    alone = q4_llm.generate([PROMPT], p)[0].token_ids
    crowd = q4_llm.generate(["Other prompt " + str(i) for i in range(5)] + [PROMPT],
                            [SamplingParams(temperature=1.0, max_tokens=30)] * 5 + [p])[-1].token_ids
    assert alone == crowd
    other_seed = q4_llm.generate([PROMPT], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24))
    assert other_seed[0].token_ids != alone


def test_top_k_1_equals_greedy(q4_llm):
    greedy = q4_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0]
    topk1 = q4_llm.generate([PROMPT], SamplingParams(temperature=1.3, top_k=1, max_tokens=20, seed=5))[0]
    assert topk1.token_ids == greedy.token_ids


def test_stop_string_ends_and_is_not_in_output(q4_llm):
    base = q4_llm.generate(["1, 2, 3, 4, 5, 6,"], SamplingParams(temperature=0, max_tokens=30))[0]
    assert " 9" in base.text
    out = q4_llm.generate(["1, 2, 3, 4, 5, 6,"], SamplingParams(temperature=0, max_tokens=30, stop=[" 9"]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == " 9"
    assert out.text == base.text[: base.text.index(" 9")]
    kept = q4_llm.generate(["1, 2, 3, 4, 5, 6,"], SamplingParams(temperature=0, max_tokens=30, stop=[" 9"],
                                                                include_stop_str_in_output=True))[0]
    assert kept.text.endswith(" 9")


def test_min_tokens_and_max_tokens(q4_llm):
    short = q4_llm.generate(["Say OK."], SamplingParams(temperature=0, max_tokens=200))[0]
    assert short.finish_reason == "stop"
    n = len(short.token_ids)
    longer = q4_llm.generate(["Say OK."], SamplingParams(temperature=0, max_tokens=200, min_tokens=n + 10))[0]
    assert len(longer.token_ids) >= n + 10
    capped = q4_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(capped.token_ids) == 5 and capped.finish_reason == "length"


def test_n_samples_share_the_prompt(q4_llm):
    out = q4_llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert out.usage.completion_tokens == sum(len(c.token_ids) for c in out.outputs)
    bm = q4_llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_logprobs_with_alternatives(q4_llm):
    out = q4_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0]
    assert len(out.logprobs) == 6
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the best
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]


@pytest.mark.parametrize("prompt", ["Write three emoji about the sea:", "把这句话翻译成中文: I love tea."])
def test_streamed_deltas_concatenate_to_final_text(q4_llm, prompt):
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=40)
        deltas = list(q4_llm.stream(prompt, params))
        final = q4_llm.generate([prompt], params)[0]
        assert "".join(d.text for d in deltas) == final.text
        assert "\ufffd" not in final.text or "\ufffd" in q4_llm.tokenizer.decode(final.token_ids)


def test_chat_stream_and_usage(q4_llm):
    deltas = list(q4_llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=10),
                              stream=True))
    assert deltas and deltas[-1].finish_reason in ("stop", "length")
    usage = deltas[-1].usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == sum(len(d.token_ids) for d in deltas)


def test_two_streams_read_in_turn_lose_nothing(q4_llm):
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    prompts = ["Name a colour.", "Count to five:"]
    streams = [q4_llm.stream(p, sp) for p, sp in zip(prompts, params)]
    texts = ["", ""]
    live = [True, True]
    while any(live):
        for i, s in enumerate(streams):
            if live[i]:
                try:
                    texts[i] += next(s).text
                except StopIteration:
                    live[i] = False
    assert texts == [o.text for o in q4_llm.generate(prompts, params)]


def test_greedy_steps_take_the_int8_head_and_keep_every_token(q4_llm, monkeypatch):
    """Argmax-only steps use the head's int8 copy plus exact re-scoring: the same tokens as the exact head."""
    import edgellm.backends.cpu as cpu

    calls = []
    for name in ("q8_0_rescore", "q8_0_rescore_screened"):  # the second after heads that bound as they store
        rescore = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, f=rescore: calls.append(f(*a)) or calls[-1])
    prompts = [PROMPT, "What is the capital of France?", "Explain recursion to a child.", "List three metals."]
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    fast = [o.token_ids for o in q4_llm.generate(prompts, greedy)]
    assert len(calls) >= 48  # every step of the batch
    calls.clear()
    runner = q4_llm.engine.runner
    vocab, runner.vocab_size = runner.vocab_size, None  # nothing may use the fast head
    try:
        exact = [o.token_ids for o in q4_llm.generate(prompts, greedy)]
    finally:
        runner.vocab_size = vocab
    assert not calls
    assert fast == exact
    q4_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=2))
    q4_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.2))
    assert not calls  # logprobs and penalties need every logit exact
