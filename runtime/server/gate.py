"""The door every request passes: draining (503), API key (401) and the in-flight limit (429).

A plain ASGI middleware rather than a FastAPI dependency, because an admitted streaming request must
hold its slot until its last byte is sent, and a dependency's scope ends before that.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.server.errors import APIError

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/api/chat", "/api/generate"})
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class Gate:
    """Counts in-flight generation requests; tells the drain when the last one has finished.

    >>> g = Gate(max_in_flight=1); g.try_admit(), g.try_admit()
    (True, False)
    """

    def __init__(self, max_in_flight: int | None = None) -> None:
        self.max_in_flight = max_in_flight or None
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def try_admit(self) -> bool:
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests from now on; wait for the in-flight ones. True if they all finished."""
        self.draining = True
        t0 = time.monotonic()
        logger.info("draining: %d request(s) in flight, waiting up to %.0f s", self.in_flight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("drain timeout: %d request(s) still in flight", self.in_flight)
            return False
        logger.info("drained in %.2f s", time.monotonic() - t0)
        return True


class GateMiddleware:
    """ASGI middleware applying ``Gate`` and the optional API key."""

    def __init__(self, app: ASGIApp, gate: Gate, api_key: str | None = None) -> None:
        self.app, self.gate = app, gate
        self._key = f"Bearer {api_key}".encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        if self._key is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        error = None
        if self.gate.draining and path != "/metrics":
            error = APIError(503, "the server is shutting down", headers={"Connection": "close",
                                                                           "Retry-After": "5"})
        elif not self._authorized(scope):
            error = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        elif path in GENERATION_PATHS and scope["method"] == "POST":
            if not self.gate.try_admit():
                error = APIError(429, f"too many requests in flight (limit {self.gate.max_in_flight}); "
                                 "retry shortly", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            else:
                await self._admitted(scope, receive, send)
                return
        if error is not None:
            await error.response(path)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run an admitted request; its slot frees as soon as its last body byte is handed to the
        transport (a client may send its next request the moment it sees the end, before the app's
        own clean-up returns), or when the app returns without sending one."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.gate.release()

        async def sending(message: Message) -> None:
            await send(message)  # the bytes are in the transport: no other request has been read since
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()

        try:
            await self.app(scope, receive, sending)
        finally:
            release()
