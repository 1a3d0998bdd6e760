"""The HTTP chat client against a mock OpenAI-compatible server, and the in-process adapter."""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from edgellm.cli.chat_clients import (
    ChatServerError,
    HttpClient,
    InProcessClient,
    chunk_of,
    parse_sse_line,
    request_body,
)
from edgellm.outputs import StreamDelta, Usage


def sse(events: list[dict[str, Any]]) -> bytes:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def test_parse_sse_line() -> None:
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line("") is None


def test_chunk_of_delta_and_usage() -> None:
    c = chunk_of(delta("Hi"))
    assert (c.text, c.tokens, c.finish_reason) == ("Hi", 1, None)
    u = chunk_of({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    assert (u.text, u.tokens, u.prompt_tokens, u.completion_tokens) == ("", 0, 5, 7)


def test_request_body_sends_openai_fields_and_non_default_extras() -> None:
    settings = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "max_tokens": 64, "seed": None,
                "repetition_penalty": 1.1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    body = request_body("m", [{"role": "user", "content": "hi"}], settings)
    assert body["stream"] is True and body["model"] == "m"
    assert body["temperature"] == 0.7 and body["max_tokens"] == 64 and "seed" not in body
    assert body["top_k"] == 40 and body["repetition_penalty"] == 1.1 and "min_p" not in body


class Server:
    """A mock /v1 server recording requests."""

    def __init__(self, status: int = 200, models: list[str] | None = None) -> None:
        self.status, self.models = status, models if models is not None else ["served-model"]
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": m} for m in self.models]})
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "model not found"}})
        events = [delta("Paris"), delta(" it is."), delta("", "stop"),
                  {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}]
        return httpx.Response(200, content=sse(events), headers={"content-type": "text/event-stream"})


def test_http_client_streams_and_authenticates() -> None:
    server = Server()
    client = HttpClient("http://box:8000", "sekrit", None, transport=httpx.MockTransport(server))
    assert client.model == "served-model"
    chunks = list(client.stream([{"role": "user", "content": "Capital of France?"}], {"temperature": 0.0}))
    assert "".join(c.text for c in chunks) == "Paris it is."
    assert chunks[-1].completion_tokens == 3 and chunks[-1].prompt_tokens == 11
    post = server.requests[-1]
    assert post.url.path == "/v1/chat/completions"
    assert post.headers["authorization"] == "Bearer sekrit"
    assert json.loads(post.content)["messages"][0]["content"] == "Capital of France?"


def test_http_client_reports_server_errors() -> None:
    client = HttpClient("http://box:8000/v1/", None, "m", transport=httpx.MockTransport(Server(status=404)))
    with pytest.raises(ChatServerError, match="404: model not found"):
        list(client.stream([{"role": "user", "content": "x"}], {}))


def test_http_client_without_models_says_so() -> None:
    with pytest.raises(ChatServerError, match="no model"):
        HttpClient("http://box", None, None, transport=httpx.MockTransport(Server(models=[])))


class FakeLLM:
    def __init__(self) -> None:
        self.closed = False
        self.calls: list[Any] = []

    def chat(self, messages, params, stream=False):
        self.calls.append((messages, params, stream))

        def gen():
            try:
                yield StreamDelta("r", 0, "Hi", [5])
                yield StreamDelta("r", 0, " there", [6, 7], "stop", usage=Usage(4, 3))
            finally:
                self.closed = True

        return gen()


def test_in_process_client_maps_deltas_and_closes() -> None:
    llm = FakeLLM()
    chunks = list(InProcessClient(llm, "m").stream([{"role": "user", "content": "hi"}], {"temperature": 0.2}))
    assert [(c.text, c.tokens) for c in chunks] == [("Hi", 1), (" there", 2)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 3
    _, params, stream = llm.calls[0]
    assert stream and params.temperature == 0.2
    assert llm.closed


def test_in_process_client_warms_up_on_a_thread_and_answers_only_after_it() -> None:
    events: list[str] = []
    release = threading.Event()

    class SlowBackend:
        def warmup(self) -> float:
            release.wait(10)
            events.append(f"warm on {threading.current_thread().name}")
            return 0.0

    llm = FakeLLM()
    llm.engine = SimpleNamespace(backend=SlowBackend())
    original = llm.chat
    llm.chat = lambda *a, **k: (events.append("chat"), original(*a, **k))[1]
    client = InProcessClient(llm, "m", warm_up=True)
    threading.Timer(0.2, release.set).start()  # the warm-up is still running when the first answer is asked for
    chunks = list(client.stream([{"role": "user", "content": "hi"}], {}))
    assert events == ["warm on edgellm-warmup", "chat"]
    assert "".join(c.text for c in chunks) == "Hi there"
    list(client.stream([{"role": "user", "content": "again"}], {}))  # later answers do not wait again
    assert events == ["warm on edgellm-warmup", "chat", "chat"]
