"""Slash-command parsing and effects on the session (no model, no terminal)."""
from __future__ import annotations

import json

import pytest

from edgellm.cli.chat_commands import COMMANDS, Command, is_command, parse_command, run_command
from edgellm.cli.chat_session import ChatSession, TurnStats


@pytest.mark.parametrize(("line", "expected"), [
    ("/help", Command("help", "")),
    ("  /SET temperature 0.7  ", Command("set", "temperature 0.7")),
    ("/system You are a pirate.", Command("system", "You are a pirate.")),
    ("/save  my file.json", Command("save", "my file.json")),
])
def test_parse(line: str, expected: Command) -> None:
    assert is_command(line)
    assert parse_command(line) == expected


def test_plain_text_is_not_a_command() -> None:
    assert not is_command("what is 1/2?")


def test_help_mentions_every_command() -> None:
    out = run_command(ChatSession(), "/help").output
    for name in ("/clear", "/system", "/set", "/save", "/load", "/stats", "/exit"):
        assert name in out
    assert run_command(ChatSession(), "/?").output == out


@pytest.mark.parametrize("line", ["/exit", "/quit", "/bye", "/EXIT"])
def test_exit_commands(line: str) -> None:
    assert run_command(ChatSession(), line).exit


def test_unknown_command_is_an_error_not_an_exit() -> None:
    result = run_command(ChatSession(), "/frobnicate now")
    assert result.error and not result.exit and "/frobnicate" in result.output


def test_set_then_set_alone_shows_it() -> None:
    s = ChatSession()
    assert run_command(s, "/set temperature 0.7").output == "Set temperature to 0.7."
    assert run_command(s, "/set top_k=12").output == "Set top_k to 12."
    listing = run_command(s, "/set").output
    assert "temperature" in listing and "0.7" in listing and "12" in listing


@pytest.mark.parametrize("line", ["/set temperature", "/set temperature -3", "/set nope 1", "/set top_k x"])
def test_bad_set_is_reported(line: str) -> None:
    s = ChatSession()
    before = dict(s.settings)
    result = run_command(s, line)
    assert result.error and result.output.startswith("/set:")
    assert s.settings == before


def test_system_set_show_and_remove() -> None:
    s = ChatSession()
    assert run_command(s, "/system").output == "No system prompt."
    run_command(s, "/system You are a pirate.")
    assert s.system == "You are a pirate."
    assert "pirate" in run_command(s, "/system").output
    run_command(s, "/system -")
    assert s.system is None


def test_clear() -> None:
    s = ChatSession()
    s.begin_turn("hi")
    s.finish_turn("hello", TurnStats())
    run_command(s, "/clear")
    assert s.history == []


def test_save_and_load(tmp_path) -> None:
    s = ChatSession(system="sys")
    s.begin_turn("My name is Ada.")
    s.finish_turn("Hi Ada.", TurnStats())
    path = tmp_path / "a b.json"
    result = run_command(s, f'/save "{path}"')
    assert not result.error, result.output
    saved = json.loads(path.read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]

    t = ChatSession()
    result = run_command(t, f'/load "{path}"')
    assert not result.error and "2 messages" in result.output
    assert t.history == s.history and t.system == "sys"


@pytest.mark.parametrize("line", ["/save", "/load", "/load /no/such/file.json", "/save /no/such/dir/x.json"])
def test_save_load_errors(line: str) -> None:
    result = run_command(ChatSession(), line)
    assert result.error and not result.exit


def test_stats() -> None:
    s = ChatSession()
    assert run_command(s, "/stats").output == "No answers yet."
    s.begin_turn("q")
    s.finish_turn("a", TurnStats(completion_tokens=21, ttft=0.1, seconds=2.1, decode_seconds=2.0))
    s.begin_turn("q2")
    s.interrupt_turn(TurnStats(completion_tokens=5, seconds=0.5))
    out = run_command(s, "/stats").output
    assert "Last answer: 5 tokens" in out and "interrupted" in out
    assert "2 answers (1 interrupted), 26 tokens" in out


def test_every_command_has_a_handler_that_runs() -> None:
    for name in COMMANDS:
        result = run_command(ChatSession(), f"/{name}")
        assert isinstance(result.output, str)
