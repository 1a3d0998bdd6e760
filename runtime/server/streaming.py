"""Streaming responses (SSE for OpenAI, NDJSON for Ollama) that always close their source.

Starlette cancels a streaming response when its client disconnects; closing the body iterator
explicitly afterwards makes the abort (and the freeing of KV blocks) immediate instead of waiting
for garbage collection of a half-run generator.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_DONE = "data: [DONE]\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that ``aclose``s its async-generator body however the response ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(item: BaseModel | dict[str, Any]) -> str:
    """One server-sent event: ``data: {json}`` and a blank line."""
    data = item.model_dump_json() if isinstance(item, BaseModel) else json.dumps(item)
    return f"data: {data}\n\n"


def ndjson(item: BaseModel | dict[str, Any]) -> str:
    """One NDJSON line; unset (None) fields are left out, as Ollama does."""
    data = item.model_dump_json(exclude_none=True) if isinstance(item, BaseModel) else json.dumps(item)
    return data + "\n"


def sse_response(events: AsyncIterator[str]) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(events, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def ndjson_response(lines: AsyncIterator[str]) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(lines, media_type="application/x-ndjson")
