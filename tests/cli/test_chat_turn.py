"""Streaming one answer: text, stats, and Ctrl-C closing the stream between chunks."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from edgellm.cli.chat_clients import Chunk
from edgellm.cli.chat_turn import catch_sigint, stream_answer


class FakeClient:
    """Yields scripted chunks; records whether its stream was closed early and what it was sent."""

    model = "fake"

    def __init__(self, chunks: list[Chunk], interrupt_after: int | None = None, fail_after: int | None = None):
        self.chunks, self.interrupt_after, self.fail_after = chunks, interrupt_after, fail_after
        self.closed_early = False
        self.sent: list[Any] = []

    def stream(self, messages: list[dict], settings: dict) -> Iterator[Chunk]:
        self.sent.append((messages, settings))
        done = False
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.fail_after:
                    raise RuntimeError("backend fell over")
                yield chunk
                if i == self.interrupt_after:
                    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does, delivered mid-answer
            done = True
        finally:
            self.closed_early = not done


def ticking_clock(step: float = 0.5):
    t = [0.0]

    def clock() -> float:
        t[0] += step
        return t[0]

    return clock


def test_streams_text_and_counts() -> None:
    chunks = [Chunk("Hel", 1), Chunk("lo", 1), Chunk("!", 1, "stop", prompt_tokens=9, completion_tokens=3)]
    client = FakeClient(chunks)
    written: list[str] = []
    answer = stream_answer(client, [{"role": "user", "content": "hi"}], {"temperature": 0.5}, written.append,
                           clock=ticking_clock())
    assert answer.text == "Hello!" and written == ["Hel", "lo", "!"]
    assert not answer.interrupted and not client.closed_early
    s = answer.stats
    assert s.completion_tokens == 3 and s.prompt_tokens == 9
    assert s.ttft == pytest.approx(0.5) and s.decode_seconds == pytest.approx(1.0)
    assert s.tokens_per_second == pytest.approx(2.0)
    assert client.sent == [([{"role": "user", "content": "hi"}], {"temperature": 0.5})]


def test_ctrl_c_stops_the_answer_and_closes_the_stream() -> None:
    chunks = [Chunk(f"w{i} ", 1) for i in range(50)] + [Chunk("", 0, "length")]
    client = FakeClient(chunks, interrupt_after=4)
    answer = stream_answer(client, [], {}, lambda _: None)
    assert answer.interrupted
    assert client.closed_early, "the stream must be closed so the engine aborts the request"
    # the signal arrives while chunk 5 is being produced: that chunk is shown, then the stream stops
    assert answer.text == "w0 w1 w2 w3 w4 w5 "
    assert answer.stats.completion_tokens == 6


def test_sigint_handler_is_restored_afterwards() -> None:
    before = signal.getsignal(signal.SIGINT)
    stream_answer(FakeClient([Chunk("x", 1, "stop")]), [], {}, lambda _: None)
    assert signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_raises() -> None:
    with catch_sigint() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_errors_propagate_after_closing() -> None:
    client = FakeClient([Chunk("a", 1), Chunk("b", 1)], fail_after=1)
    with pytest.raises(RuntimeError, match="fell over"):
        stream_answer(client, [], {}, lambda _: None)
