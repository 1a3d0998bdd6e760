"""The in-flight gate, without a server: a slot frees when the response's last byte is sent."""
from __future__ import annotations

import asyncio

from edgellm.server.gate import Gate, GateMiddleware

SCOPE = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": []}


async def _receive():
    return {"type": "http.request", "body": b"", "more_body": False}


def test_slot_frees_at_the_last_body_byte_before_the_app_returns() -> None:
    async def run() -> list[int]:
        gate = Gate(max_in_flight=1)
        seen: list[int] = []
        cleanup = asyncio.Event()

        async def app(scope, receive, send):  # a streaming response whose clean-up outlives its last byte
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            seen.append(gate.in_flight)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            seen.append(gate.in_flight)
            await cleanup.wait()

        async def send(message):
            return None

        task = asyncio.create_task(GateMiddleware(app, gate)(SCOPE, _receive, send))
        for _ in range(10):
            await asyncio.sleep(0)
        assert gate.try_admit()  # the next request is admitted while the first one still cleans up
        gate.release()
        cleanup.set()
        await task
        seen.append(gate.in_flight)
        return seen

    assert asyncio.run(run()) == [1, 0, 0]


def test_slot_frees_when_the_app_fails_before_sending_anything() -> None:
    async def run() -> int:
        gate = Gate(max_in_flight=1)

        async def app(scope, receive, send):
            raise RuntimeError("boom")

        async def send(message):
            return None

        try:
            await GateMiddleware(app, gate)(SCOPE, _receive, send)
        except RuntimeError:
            pass
        return gate.in_flight

    assert asyncio.run(run()) == 0
