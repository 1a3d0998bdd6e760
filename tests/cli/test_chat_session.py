"""The chat session state machine: turns, interruptions, settings, save/load (no model)."""
from __future__ import annotations

import json

import pytest

from edgellm.cli.chat_session import (
    DEFAULT_SETTINGS,
    ChatSession,
    ConversationFileError,
    SettingError,
    TurnStats,
)


def test_turns_accumulate_with_system_first() -> None:
    s = ChatSession(system="Be brief.")
    sent = s.begin_turn("My name is Ada.")
    assert sent == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ada."}]
    s.finish_turn("Hello Ada!", TurnStats(completion_tokens=4, seconds=1.0))
    sent = s.begin_turn("What is my name?")
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[2]["content"] == "Hello Ada!"


def test_messages_are_copies() -> None:
    s = ChatSession()
    sent = s.begin_turn("hi")
    sent[0]["content"] = "changed"
    assert s.history[0]["content"] == "hi"


def test_interrupt_drops_the_partial_answer_and_keeps_the_question() -> None:
    s = ChatSession()
    s.begin_turn("Tell me a long story")
    s.interrupt_turn(TurnStats(completion_tokens=7, seconds=0.3))
    assert s.history == [{"role": "user", "content": "Tell me a long story"}]
    assert s.last is not None and s.last.interrupted
    assert s.totals.answers == 1 and s.totals.interrupted == 1 and s.totals.completion_tokens == 7
    assert not s.pending
    s.begin_turn("Another question")  # the chat goes on


def test_failed_turn_forgets_the_question() -> None:
    s = ChatSession()
    s.begin_turn("hi")
    s.fail_turn()
    assert s.history == [] and not s.pending and s.last is None


def test_turn_order_is_enforced() -> None:
    s = ChatSession()
    with pytest.raises(AssertionError):
        s.finish_turn("x", TurnStats())
    s.begin_turn("a")
    with pytest.raises(AssertionError):
        s.begin_turn("b")
    with pytest.raises(ValueError):
        ChatSession().begin_turn("   ")


def test_clear_keeps_system_and_settings() -> None:
    s = ChatSession(system="sys")
    s.set("temperature", "0.1")
    s.begin_turn("hi")
    s.finish_turn("hello", TurnStats())
    s.clear()
    assert s.history == [] and s.system == "sys" and s.settings["temperature"] == 0.1


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("temperature", "0.7", 0.7), ("top_p", "0.5", 0.5), ("top_k", "20", 20), ("min_p", "0.05", 0.05),
    ("max_tokens", "64", 64), ("seed", "42", 42), ("seed", "none", None), ("max_tokens", "None", None),
    ("repetition_penalty", "1.2", 1.2), ("presence_penalty", "-0.5", -0.5), ("frequency_penalty", "1", 1.0),
    ("Top-P", "0.3", 0.3),
])
def test_set_parses_and_stores(name: str, raw: str, value: object) -> None:
    s = ChatSession()
    assert s.set(name, raw) == value
    assert s.settings[name.lower().replace("-", "_")] == value


@pytest.mark.parametrize(("name", "raw", "needle"), [
    ("temperature", "hot", "a number"), ("top_k", "1.5", "an integer"), ("temperature", "-1", "temperature"),
    ("top_p", "0", "top_p"), ("min_p", "2", "min_p"), ("presence_penalty", "3", "presence_penalty"),
    ("max_tokens", "0", "max_tokens"), ("warmth", "1", "unknown setting"), ("temperature", "none", "a number"),
])
def test_set_rejects_bad_values_and_keeps_the_old_ones(name: str, raw: str, needle: str) -> None:
    s = ChatSession()
    with pytest.raises(SettingError, match=needle):
        s.set(name, raw)
    assert s.settings == DEFAULT_SETTINGS


def test_describe_settings_lists_every_setting() -> None:
    s = ChatSession()
    s.set("temperature", "0.25")
    text = s.describe_settings()
    assert "temperature" in text and "0.25" in text
    assert all(k in text for k in DEFAULT_SETTINGS)


def test_save_and_load_round_trip(tmp_path) -> None:
    s = ChatSession(system="You are terse.")
    s.set("temperature", "0.3")
    s.begin_turn("My name is Ada.")
    s.finish_turn("Noted.", TurnStats())
    path = s.save(tmp_path / "conv.json")
    data = json.loads(path.read_text())
    assert data["messages"][0] == {"role": "system", "content": "You are terse."}
    assert data["settings"]["temperature"] == 0.3

    t = ChatSession()
    assert t.load(path) == 2
    assert t.system == "You are terse." and t.history == s.history and t.settings == s.settings


def test_load_accepts_a_plain_message_list(tmp_path) -> None:
    path = tmp_path / "msgs.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    s = ChatSession(system="old")
    assert s.load(path) == 2
    assert s.system is None


@pytest.mark.parametrize("content", [
    "not json", '{"messages": 3}', '[{"role": "wizard", "content": "x"}]', '[{"role": "user"}]',
    '{"messages": [], "settings": {"warmth": 1}}', '{"messages": [], "settings": {"temperature": -2}}',
])
def test_load_rejects_bad_files_and_keeps_the_conversation(tmp_path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    s = ChatSession(system="keep")
    s.begin_turn("q")
    s.finish_turn("a", TurnStats())
    with pytest.raises(ValueError):
        s.load(path)
    assert s.system == "keep" and len(s.history) == 2 and s.settings == DEFAULT_SETTINGS
    assert issubclass(ConversationFileError, ValueError)


def test_turn_stats_rates_and_summary() -> None:
    stats = TurnStats(prompt_tokens=12, completion_tokens=11, ttft=0.2, seconds=1.2, decode_seconds=1.0)
    assert stats.tokens_per_second == pytest.approx(10.0)
    assert stats.summary() == "11 tokens, 10.0 tokens/s, TTFT 0.20 s, prompt 12 tokens"
    assert TurnStats(completion_tokens=1, decode_seconds=0.0).tokens_per_second is None
    assert "interrupted" in TurnStats(interrupted=True).summary()
