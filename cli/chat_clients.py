"""Where ``edgellm chat`` sends a conversation: the engine in this process, or a running server.

Both stream ``Chunk``s; closing the stream stops the answer (the in-process engine aborts the
request and frees its KV blocks; the HTTP client closes the connection, which the server treats
as an abort).
"""
from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, Any]

# sampling settings the OpenAI API names itself; the rest go as extra fields (vLLM does the same)
_OPENAI_FIELDS = ("temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty")
_EXTRA_DEFAULTS = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass
class Chunk:
    """A piece of an answer: new text, how many tokens it took, and at the end, why it ended."""

    text: str
    tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # known at the end, when the backend reports usage
    completion_tokens: int | None = None


class ChatClient(Protocol):
    """Streams a model's answer to a conversation."""

    model: str

    def stream(self, messages: list[Message], settings: dict[str, Any]) -> Iterator[Chunk]: ...


class InProcessClient:
    """Chat with an ``LLM`` loaded in this process, through the model's chat template.

    ``warm_up``: load the backend's kernels on a background thread (the model was loaded without
    them), so the prompt shows ~0.5 s sooner and the kernels are ready while the user types; the
    first answer waits for the thread, so no step ever runs beside it.
    """

    def __init__(self, llm: Any, model: str, warm_up: bool = False) -> None:
        self.llm = llm
        self.model = model
        self._warming: threading.Thread | None = None
        if warm_up:
            self._warming = threading.Thread(target=llm.engine.backend.warmup, name="edgellm-warmup", daemon=True)
            self._warming.start()

    def wait_until_warm(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None

    def stream(self, messages: list[Message], settings: dict[str, Any]) -> Iterator[Chunk]:
        from edgellm.sampling_params import SamplingParams

        self.wait_until_warm()
        deltas = self.llm.chat(messages, SamplingParams(**settings), stream=True)
        with contextlib.closing(deltas):
            for d in deltas:
                usage = d.usage
                yield Chunk(d.text, len(d.token_ids), d.finish_reason,
                            usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None)


class ChatServerError(RuntimeError):
    """The server answered with an error; the message carries its status and explanation."""


def _server_error(status: int, body: bytes) -> ChatServerError:
    try:
        detail = json.loads(body)
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = body.decode(errors="replace")[:300]
    return ChatServerError(f"server answered {status}: {detail}")


def request_body(model: str, messages: list[Message], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a streaming OpenAI chat-completions request for these settings."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({k: settings[k] for k in _OPENAI_FIELDS if settings.get(k) is not None})
    body.update({k: settings[k] for k, off in _EXTRA_DEFAULTS.items() if settings.get(k, off) != off})
    return body


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON event of one ``data:`` line of a server-sent-events stream; None for others and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


class HttpClient:
    """Chat with a running ``edgellm serve`` (or any OpenAI-compatible server) over HTTP."""

    def __init__(self, url: str, api_key: str | None, model: str | None, timeout: float = 600.0,
                 transport: Any = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        response = self.http.get(f"{self.base}/models")
        if response.status_code != 200:
            raise _server_error(response.status_code, response.content)
        models = response.json().get("data") or []
        if not models:
            raise ChatServerError(f"{self.base}/models lists no model; name one: edgellm chat MODEL --url ...")
        return models[0]["id"]

    def stream(self, messages: list[Message], settings: dict[str, Any]) -> Iterator[Chunk]:
        body = request_body(self.model, messages, settings)
        with self.http.stream("POST", f"{self.base}/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise _server_error(response.status_code, response.read())
            for line in response.iter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                if "error" in event:
                    raise _server_error(500, json.dumps(event).encode())
                yield chunk_of(event)


def chunk_of(event: dict[str, Any]) -> Chunk:
    """A ``Chunk`` from one chat-completion stream event (a delta, or the final usage-only event)."""
    choices = event.get("choices") or []
    choice = choices[0] if choices else {}
    text = (choice.get("delta") or {}).get("content") or ""
    usage = event.get("usage") or {}
    return Chunk(text, 1 if text else 0, choice.get("finish_reason"),
                 usage.get("prompt_tokens"), usage.get("completion_tokens"))
