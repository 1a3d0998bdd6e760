"""Slash commands of ``edgellm chat``: parsed and applied to a ``ChatSession``; no terminal I/O.

>>> from edgellm.cli.chat_session import ChatSession
>>> s = ChatSession()
>>> run_command(s, "/set temperature 0.2").output
'Set temperature to 0.2.'
>>> run_command(s, "/bye").exit
True
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from edgellm.cli.chat_session import ChatSession, SettingError


@dataclass(frozen=True)
class Command:
    """A parsed slash command: ``/set temperature 0.7`` is ``Command("set", "temperature 0.7")``."""

    name: str
    arg: str


@dataclass(frozen=True)
class CommandResult:
    """What a command says back, whether it failed, and whether the chat should end."""

    output: str = ""
    error: bool = False
    exit: bool = False


HELP = """Commands:
  /help                 this help (also /?)
  /clear                forget the conversation (the system prompt stays)
  /system [TEXT]        set the system prompt (no TEXT: show it; /system - removes it)
  /set [NAME VALUE]     change a sampling setting; /set alone shows them all
                        (temperature, top_p, top_k, min_p, max_tokens, seed, repetition_penalty,
                        presence_penalty, frequency_penalty; seed/max_tokens take "none")
  /save FILE            save the conversation as JSON
  /load FILE            load a conversation saved with /save (or a JSON list of messages)
  /stats                tokens, tokens/s and time to first token of the last answer; session totals
  /exit                 leave (also /quit, /bye, Ctrl-D)

Ctrl-C stops an answer (the partial answer is dropped, the question kept, as in ollama).
Start a message with \"\"\" to write several lines; end it with \"\"\"."""


def is_command(line: str) -> bool:
    """Whether ``line`` is a slash command rather than a message."""
    return line.lstrip().startswith("/")


def parse_command(line: str) -> Command:
    """Split ``/name rest`` into its name (lower-cased) and the rest (stripped).

    >>> parse_command("  /SET  temperature 0.7 ")
    Command(name='set', arg='temperature 0.7')
    """
    assert is_command(line), line
    name, _, arg = line.strip()[1:].partition(" ")
    return Command(name.lower(), arg.strip())


def _path_arg(arg: str, usage: str) -> str:
    parts = shlex.split(arg) if arg else []
    if len(parts) != 1:
        raise SettingError(f"usage: {usage}")
    return parts[0]


def _help(session: ChatSession, arg: str) -> CommandResult:
    return CommandResult(HELP)


def _clear(session: ChatSession, arg: str) -> CommandResult:
    session.clear()
    return CommandResult("Cleared the conversation.")


def _system(session: ChatSession, arg: str) -> CommandResult:
    if not arg:
        return CommandResult(f"System prompt: {session.system}" if session.system else "No system prompt.")
    session.system = None if arg == "-" else arg
    return CommandResult("Removed the system prompt." if session.system is None else "Set the system prompt.")


def _set(session: ChatSession, arg: str) -> CommandResult:
    if not arg:
        return CommandResult(session.describe_settings())
    name, _, raw = arg.replace("=", " ", 1).partition(" ")
    if not raw.strip():
        raise SettingError(f"usage: /set {name} VALUE")
    value = session.set(name, raw.strip())
    return CommandResult(f"Set {name.lower().replace('-', '_')} to {value}.")


def _save(session: ChatSession, arg: str) -> CommandResult:
    path = session.save(_path_arg(arg, "/save FILE"))
    return CommandResult(f"Saved {len(session.history)} messages to {path}.")


def _load(session: ChatSession, arg: str) -> CommandResult:
    count = session.load(_path_arg(arg, "/load FILE"))
    return CommandResult(f"Loaded {count} messages" + (" and a system prompt." if session.system else "."))


def _stats(session: ChatSession, arg: str) -> CommandResult:
    if session.last is None:
        return CommandResult("No answers yet.")
    t = session.totals
    rate = f", {t.completion_tokens / t.seconds:.1f} tokens/s overall" if t.seconds > 0 else ""
    return CommandResult(f"Last answer: {session.last.summary()}\n"
                         f"Session: {t.answers} answers ({t.interrupted} interrupted), "
                         f"{t.completion_tokens} tokens in {t.seconds:.1f} s{rate}")


def _exit(session: ChatSession, arg: str) -> CommandResult:
    return CommandResult(exit=True)


COMMANDS: dict[str, Callable[[ChatSession, str], CommandResult]] = {
    "help": _help, "?": _help, "clear": _clear, "system": _system, "set": _set, "save": _save,
    "load": _load, "stats": _stats, "exit": _exit, "quit": _exit, "bye": _exit,
}


def run_command(session: ChatSession, line: str) -> CommandResult:
    """Apply one slash command to ``session``; errors come back as ``CommandResult(error=True)``."""
    command = parse_command(line)
    handler = COMMANDS.get(command.name)
    if handler is None:
        return CommandResult(f"Unknown command /{command.name}. Type /help for the list.", error=True)
    try:
        return handler(session, command.arg)
    except (ValueError, OSError) as e:
        return CommandResult(f"/{command.name}: {e}", error=True)
