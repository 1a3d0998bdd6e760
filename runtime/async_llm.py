"""``AsyncLLM``: the engine on a background thread, served to asyncio code.

The engine steps on its own thread (torch releases the GIL inside kernels), so the event loop stays
free for HTTP and streaming. Requests and aborts are handed over through a queue drained before every
step; outputs come back to each request's ``asyncio.Queue``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from edgellm.engine import LLMEngine
from edgellm.llm import engine_config
from edgellm.outputs import RequestOutput
from edgellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Idle work (paging the KV pool in) waits this long after the last step, so the short gaps between
# one client's requests do not make the next request wait behind a piece of it.
IDLE_GRACE_S = 0.1


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    """Serve many concurrent requests from asyncio.

    >>> engine = AsyncLLM("smollm2-135m-instruct")                       # doctest: +SKIP
    >>> async for out in engine.generate("Hello", SamplingParams(max_tokens=8), request_id="r1"):
    ...     print(out.outputs[0].delta_text, end="")                      # doctest: +SKIP
    """

    def __init__(self, model: str = "smollm2-135m-instruct", engine: LLMEngine | None = None,
                 **engine_options: Any) -> None:
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self.engine = engine
        # The engine is built on the thread that runs it. GNU OpenMP counts every thread that ever
        # led a parallel region; once there are more than cores (the loader's ops on this thread
        # plus the engine's), its workers stop spinning between regions and each multi-threaded
        # kernel pays a futex wake-up: 23 ms per decode step instead of 13 on 2 cores.
        built: list[BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(model, engine_options, ready, built),
                                        name="edgellm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if built:
            raise built[0]

    def _run(self, model: str, options: dict[str, Any], ready: threading.Event,
             built: list[BaseException]) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(engine_config(model, **options))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the constructor
            built.append(exc)
            return
        finally:
            ready.set()
        self._loop()

    # -- facts for the server ----------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self):
        return self.engine.stats()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- requests ----------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield cumulative ``RequestOutput``s (with this step's deltas) until the request finishes.

        Invalid input raises ``ValueError`` before anything is queued. Leaving the loop early (a
        client that went away, a cancelled task) aborts the request and frees its KV blocks.
        """
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        req = self.engine.make_request(rid, prompt, params or SamplingParams(), priority)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", req))
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------------
    def _deliver(self, rid: str, item: Any) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._inbox.put(("abort", rid))

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one thread-safe call (one wake-up per step,
        not one per stream: at 32 streams the per-call cost showed in the serving figures)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                batches.setdefault(target[0], []).append((target[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for _, out in items:
                    self._inbox.put(("abort", out.request_id))

    def _drain_inbox(self, timeout: float | None) -> bool:
        """Hand queued requests and aborts to the engine, waiting up to ``timeout`` seconds for the
        first (None: not at all); False once asked to stop."""
        block = timeout is not None
        while True:
            try:
                kind, arg = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                try:
                    self.engine.add_request(arg.request_id, arg)
                except Exception as exc:  # noqa: BLE001 - reported to that request alone
                    self._deliver(arg.request_id, exc)
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._deliver(arg, out)

    def _loop(self) -> None:
        engine = self.engine
        last_busy = time.monotonic()
        while True:
            idle = not engine.has_unfinished_requests()
            if not idle:
                timeout = None
            elif engine.has_idle_work():  # wait out the grace period, then work between checks
                left = last_busy + IDLE_GRACE_S - time.monotonic()
                timeout = left if left > 0 else None
            else:
                timeout = 0.5
            if not self._drain_inbox(timeout):
                break
            if not engine.has_unfinished_requests():
                if time.monotonic() >= last_busy + IDLE_GRACE_S:
                    engine.idle_work()  # a few ms at a time, then back to the inbox
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down silently
                logger.exception("engine step failed; aborting the requests in flight")
                for rid in list(engine.requests):
                    engine.abort_request(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))
                continue
            finally:
                last_busy = time.monotonic()
            self._deliver_all(outputs)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
