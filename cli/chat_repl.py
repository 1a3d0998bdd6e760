"""The interactive loop of ``edgellm chat``: read a line, run a slash command or ask the model.

Line editing and history come from prompt_toolkit. Answers stream to stdout; statistics and
notices go to stderr (dim), so they never mix into a transcript of the conversation.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from edgellm.cli.chat_clients import ChatClient
from edgellm.cli.chat_commands import is_command, run_command
from edgellm.cli.chat_session import ChatSession
from edgellm.cli.chat_turn import Answer, stream_answer
from edgellm.cli.errors import one_line
from edgellm.cli.terminal import no_echo

logger = logging.getLogger(__name__)

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
EXIT_HINT = "Use Ctrl-D or /exit to leave."


def notice(text: str, error: bool = False) -> None:
    """A dim line on stderr (red for errors)."""
    click.secho(text, err=True, dim=not error, fg="red" if error else None)


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def ask(client: ChatClient, session: ChatSession, text: str) -> Answer | None:
    """Send one user message and stream the answer; None if the request failed (the error is shown)."""
    messages = session.begin_turn(text)
    try:
        with no_echo():
            answer = stream_answer(client, messages, session.settings, write_out)
    except Exception as e:
        session.fail_turn()
        logger.debug("request failed", exc_info=True)
        notice(f"\nerror: {one_line(e)}", error=True)
        return None
    if answer.text and not answer.text.endswith("\n"):
        write_out("\n")
    if answer.interrupted:
        session.interrupt_turn(answer.stats)
        notice("[stopped; the partial answer is not kept in the conversation]")
    else:
        session.finish_turn(answer.text, answer.stats)
    notice(answer.stats.summary())
    return answer


class LineReader:
    """prompt_toolkit input with history; ``\"\"\"`` starts and ends a multi-line message."""

    def __init__(self, history_file: Path | None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history: Any = InMemoryHistory()
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(history_file))
            except OSError as e:
                notice(f"no input history: {e}")
        self.prompt = PromptSession(history=history)

    def buffer_empty(self) -> bool:
        return not self.prompt.default_buffer.text.strip()

    def read(self) -> str:
        """The next message or command. Raises EOFError (Ctrl-D) and KeyboardInterrupt (Ctrl-C)."""
        line = self.prompt.prompt(PROMPT)
        if not line.lstrip().startswith(FENCE):
            return line
        body = line.lstrip()[len(FENCE):]
        lines = []
        while not body.rstrip().endswith(FENCE):
            lines.append(body)
            body = self.prompt.prompt(CONTINUATION)
        lines.append(body.rstrip()[:-len(FENCE)])
        return "\n".join(lines).strip("\n")


def run_repl(client: ChatClient, session: ChatSession, history_file: Path | None) -> None:
    """Chat until /exit or Ctrl-D."""
    reader = LineReader(history_file)
    notice(f"Chatting with {client.model}. /help for commands; Ctrl-C stops an answer; {EXIT_HINT}")
    while True:
        try:
            line = reader.read()
        except KeyboardInterrupt:
            if reader.buffer_empty():
                notice(EXIT_HINT)
            continue
        except EOFError:
            break
        if not line.strip():
            continue
        if is_command(line):
            result = run_command(session, line)
            if result.output:
                notice(result.output, error=result.error) if result.error else click.echo(result.output)
            if result.exit:
                break
            continue
        ask(client, session, line)
        click.echo()
