"""``serve``: load the engine, run uvicorn, and drain gracefully on SIGTERM/SIGINT.

On the first signal the server keeps listening but answers new requests with 503, lets in-flight
requests (streams included) finish for up to ``drain_timeout`` seconds, then stops uvicorn and the
engine and returns 0. A second SIGINT stops at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

from edgellm.server.app import build_app
from edgellm.server.gate import Gate
from edgellm.server.settings import ServerSettings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own (connection-level) graceful shutdown.

    uvicorn's handler re-raises the signal after shutting down, which makes the process exit with the
    signal's status; this one treats a drained shutdown as a normal exit.
    """

    def __init__(self, config: uvicorn.Config, gate: Gate, drain_timeout: float) -> None:
        super().__init__(config)
        self.gate, self.drain_timeout = gate, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            logger.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            self.gate.draining = True
            return
        logger.info("%s: draining before shutdown", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.gate.drain(self.drain_timeout)
        self.should_exit = True


def serve_engine(engine: Any, settings: ServerSettings) -> int:
    """Serve an already built engine until a signal drains it; returns the exit status."""
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(config, app.state.ctx.gate, settings.drain_timeout)
    server.run()
    return 0 if server.started else 1


def serve(settings: ServerSettings) -> int:
    """Load ``settings.model`` into an ``AsyncLLM`` and serve it (blocking); returns the exit status.

    >>> serve(ServerSettings(model="smollm2-135m-instruct", port=8000))  # doctest: +SKIP
    """
    from edgellm.async_llm import AsyncLLM

    engine = AsyncLLM(settings.model, **settings.engine_options)
    try:
        return serve_engine(engine, settings)
    finally:
        engine.shutdown()
