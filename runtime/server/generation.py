"""Running engine requests for HTTP handlers: validate up front, merge batches, stop on disconnect.

``start`` submits one engine request per prompt and waits for each one's first output, so bad input
(``ValueError`` from tokenizing, SamplingParams or the context check) surfaces before any response
byte is sent and can become a 400. Closing a ``Generations`` aborts whatever is still running.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from starlette.requests import Request

from edgellm.outputs import RequestOutput
from edgellm.sampling_params import SamplingParams
from edgellm.server.context import ServerContext
from edgellm.server.errors import APIError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Prompt = str | list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def _tracked(ctx: ServerContext, prompt: Prompt, params: SamplingParams, rid: str,
                   priority: int) -> AsyncIterator[RequestOutput]:
    """``engine.generate`` that records the request's outcome and timings in the metrics."""
    last: RequestOutput | None = None
    outcome = "error"
    try:
        async with aclosing(ctx.engine.generate(prompt, params, rid, priority)) as outputs:
            async for out in outputs:
                last = out
                yield out
        outcome = (last.outputs[0].finish_reason if last and last.outputs else None) or "abort"
    except ValueError:
        outcome = "rejected"
        raise
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "abort"
        raise
    finally:
        ctx.metrics.observe(last, outcome)


class Generations:
    """The engine requests behind one HTTP request (one per prompt), each already past validation."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput]) -> None:
        self._streams, self._firsts = streams, firsts
        self._tasks: list[asyncio.Task] = []

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt index, output)`` as outputs arrive, first outputs first."""
        for i, first in enumerate(self._firsts):
            yield i, first
        if len(self._streams) == 1:
            async for out in self._streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, e))

        self._tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        remaining = len(self._tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    async def finals(self) -> list[RequestOutput]:
        """Run every request to the end; its last (cumulative) output, in prompt order."""
        last = list(self._firsts)
        async for i, out in self.outputs():
            last[i] = out
        return last

    async def aclose(self) -> None:
        """Abort what is still running (no-op for finished requests)."""
        if self._tasks:  # the pumps own the streams: cancelling one closes its stream
            for t in self._tasks:
                t.cancel()
            return
        for s in self._streams:
            await s.aclose()  # type: ignore[attr-defined]


async def start(ctx: ServerContext, prompts: list[Prompt], params: SamplingParams, priority: int,
                request_id: str) -> Generations:
    """Submit every prompt; raise (``ValueError`` for bad input) before returning if any is refused."""
    streams = [
        _tracked(ctx, p, params, f"{request_id}-{i}" if len(prompts) > 1 else request_id, priority)
        for i, p in enumerate(prompts)
    ]

    async def first(s: AsyncIterator[RequestOutput]) -> RequestOutput:
        return await anext(s)

    results = await asyncio.gather(*(first(s) for s in streams), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        if isinstance(failures[0], StopAsyncIteration):
            raise RuntimeError("the engine ended a request without any output")
        raise failures[0]
    return Generations(streams, results)  # type: ignore[arg-type]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():  # the client left; nobody will read this response
            raise APIError(499, "client closed the request") from None
        raise
    finally:
        watcher.cancel()
