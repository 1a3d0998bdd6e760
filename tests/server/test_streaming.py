"""SSE events spliced from a template are the bytes the response models write."""
from __future__ import annotations

import pytest

from edgellm.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from edgellm.server.streaming import SplicedEvents, sse

TEXTS = ["", " Paris", 'say "hi"\\n', "tab\there\nnew\r\x00\x1f\x7f", "é漢字🙂", "\u2028\u2029", "\ufffd"]


def _chat(index: int, finish: str | None, text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="chatcmpl-1", created=1765000000, model="m", choices=[
        ChatChunkChoice(index=index, delta=DeltaMessage(content=text), finish_reason=finish)])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("key", [(0, None), (3, "length"), (1, "stop")])
def test_chat_events_are_the_models_bytes(key: tuple[int, str | None], text: str) -> None:
    events = SplicedEvents(lambda k: _chat(k[0], k[1], SplicedEvents.SPLICE))
    assert events.event(key, text) == sse(_chat(key[0], key[1], text))


def test_completion_events_are_the_models_bytes() -> None:
    def make(idx: int, text: str) -> CompletionResponse:
        return CompletionResponse(id="cmpl-1", created=1, model="m", choices=[CompletionChoice(index=idx, text=text)])

    events = SplicedEvents(lambda idx: make(idx, SplicedEvents.SPLICE))
    for idx in (0, 2):
        for text in TEXTS:
            assert events.event(idx, text) == sse(make(idx, text))


def test_every_character_is_escaped_as_pydantic_escapes_it() -> None:
    events = SplicedEvents(lambda k: _chat(0, None, SplicedEvents.SPLICE))
    for start in range(0, 0x110000, 4096):
        text = "".join(chr(c) for c in range(start, min(start + 4096, 0x110000)) if not 0xD800 <= c < 0xE000)
        assert events.event((0, None), text) == sse(_chat(0, None, text)), hex(start)


def test_a_model_without_the_splice_string_or_with_two_is_refused() -> None:
    events = SplicedEvents(lambda k: _chat(0, None, "no mark"))
    with pytest.raises(ValueError, match="exactly once"):
        events.event((0, None), "x")
    two = ChatCompletionChunk(id="c", created=1, model="m", choices=[
        ChatChunkChoice(index=i, delta=DeltaMessage(content=SplicedEvents.SPLICE)) for i in range(2)])
    with pytest.raises(ValueError, match="exactly once"):
        SplicedEvents(lambda k: two).event(0, "x")
