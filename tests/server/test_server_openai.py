"""The official ``openai`` client against a real ``edgellm serve``: chat and completions, streamed and not."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from .conftest import MAX_MODEL_LEN, SERVED_NAME, ServerProcess

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=600, max_retries=0) as c:
        yield c


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_stream_matches_non_stream_and_reports_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert full.object == "text_completion" and "Paris" in full.choices[0].text
    chunks = list(client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 8


def test_n2_gives_two_choices_streamed_and_not(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=8, n=2, temperature=1.0,
                                       seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 16
    texts: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=8, n=2,
                                                temperature=1.0, seed=3, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in finished, "a choice finished twice"
                finished[c.index] = c.finish_reason
    assert set(finished) == {0, 1}
    assert texts == {c.index: c.message.content for c in r.choices}  # same seed, same samples

    comp = client.completions.create(model=SERVED_NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=4, n=2,
                                     temperature=1.0, seed=5)
    assert sorted(c.index for c in comp.choices) == [0, 1, 2, 3]


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).strip() == r.choices[0].message.content.strip()
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode("utf-8"))
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
    streamed = [lp for c in client.chat.completions.create(
        model=SERVED_NAME, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, top, val in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert tok in top and top[tok] == pytest.approx(val) and 2 <= len(top) <= 3


def test_stop_strings_end_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0).choices[0]
    word = free.text.split()[1] if len(free.text.split()) > 1 else free.text.split()[0]
    cut = free.text.index(word)
    for stop in (word, [word, "zzzz"]):
        r = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop)
        assert r.choices[0].text == free.text[:cut]
        assert r.choices[0].finish_reason == "stop"


def test_seed_reproduces(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=SERVED_NAME, prompt="My favourite animal is", max_tokens=10,
                                         temperature=1.0, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2), sample(3)}) > 1  # seeds matter, it is not greedy in disguise


def test_token_id_prompts_echo_and_cached_tokens(client: openai.OpenAI, server: ServerProcess) -> None:
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=60).json()["tokens"]
    by_text = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=SERVED_NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in batch.choices] == [by_text.choices[0].text] * 2
    echo = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + by_text.choices[0].text

    long_prompt = "Edge devices run small language models. " * 12  # several full KV blocks
    client.completions.create(model=SERVED_NAME, prompt=long_prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=SERVED_NAME, prompt=long_prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_sampling_extras_are_accepted(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={"12": -100}, seed=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True,
                    "stop_token_ids": [2], "priority": 1})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_completion_tokens=3,
                                          temperature=0)
    assert chat.usage.completion_tokens <= 3


def test_openapi_describes_the_routes(server: ServerProcess) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=60).json()
    paths = spec["paths"]
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/health",
                 "/version", "/metrics", "/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps",
                 "/api/version"):
        assert path in paths, path
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
    schemas = spec["components"]["schemas"]
    assert {"messages", "temperature", "top_k", "logprobs", "top_logprobs"} <= set(
        schemas["ChatCompletionRequest"]["properties"])
    assert "prompt" in schemas["CompletionRequest"]["required"]
    ok = paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in ok and ok["application/json"]["schema"]["$ref"].endswith("/CompletionResponse")


def test_tokenize_detokenize_health_version(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as h:
        t = h.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
        assert t["count"] == len(t["tokens"]) == len(t["token_strs"]) and t["max_model_len"] == MAX_MODEL_LEN
        assert h.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"].strip() == "hello world"
        chat = h.post("/tokenize", json={"messages": CHAT}).json()
        assert chat["count"] > t["count"]
        assert h.get("/health").status_code == 200
        assert h.get("/version").json()["version"]
