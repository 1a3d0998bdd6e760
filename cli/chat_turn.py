"""Stream one answer to the terminal, timing it, and let Ctrl-C stop it cleanly.

Ctrl-C during an answer only raises a flag; the loop sees it after the current chunk and closes the
stream, so the engine aborts the request between steps (never in the middle of one) and frees its
blocks. A second Ctrl-C, for a stream that has stopped producing chunks, raises at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from edgellm.cli.chat_clients import ChatClient, Message
from edgellm.cli.chat_session import TurnStats


@dataclass
class InterruptFlag:
    """Set by the first Ctrl-C while ``catch_sigint`` is active."""

    requested: bool = False


@contextlib.contextmanager
def catch_sigint() -> Iterator[InterruptFlag]:
    """While active (in the main thread), the first SIGINT sets the flag; the second raises KeyboardInterrupt."""
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Answer:
    text: str
    stats: TurnStats

    @property
    def interrupted(self) -> bool:
        return self.stats.interrupted


def stream_answer(client: ChatClient, messages: list[Message], settings: dict[str, Any],
                  write: Callable[[str], None], clock: Callable[[], float] = time.perf_counter) -> Answer:
    """Send ``messages``; pass each piece of text to ``write`` as it arrives; return the answer and its stats.

    Errors from the client propagate (after the stream is closed); an interrupted answer comes back
    with ``stats.interrupted`` set and the text produced so far.
    """
    stats = TurnStats()
    parts: list[str] = []
    start = clock()
    first = last = None
    finished = cut = False
    stream = client.stream(messages, settings)
    with catch_sigint() as flag, contextlib.closing(stream):
        try:
            for chunk in stream:
                now = clock()
                if chunk.tokens or chunk.text:
                    first = now if first is None else first
                    last = now
                stats.completion_tokens += chunk.tokens
                if chunk.text:
                    parts.append(chunk.text)
                    write(chunk.text)
                if chunk.completion_tokens is not None:
                    stats.completion_tokens = chunk.completion_tokens
                if chunk.prompt_tokens is not None:
                    stats.prompt_tokens = chunk.prompt_tokens
                finished = finished or chunk.finish_reason is not None
                if flag.requested and not finished:
                    cut = True
                    break
        except KeyboardInterrupt:
            cut = True
    stats.interrupted = cut
    end = clock()
    stats.seconds = end - start
    if first is not None:
        stats.ttft = first - start
        stats.decode_seconds = (last or first) - first
    return Answer("".join(parts), stats)
