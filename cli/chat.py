"""``edgellm chat [MODEL]``: talk to a model in the terminal, or answer piped input for scripts."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgellm.cli import quick_exit
from edgellm.cli.options import DEFAULT_MODEL, MODEL, chat_sampling_options, engine_options


def default_history_file() -> Path:
    """Input history of ``edgellm chat``: ``<cache root>/chat_history``."""
    from edgellm.catalog import cache_root

    return cache_root() / "chat_history"


def make_client(model: str | None, url: str | None, api_key: str | None, engine: dict[str, Any]) -> Any:
    """An HTTP client for ``--url``, else the engine loaded in this process."""
    if url:
        from edgellm.cli.chat_clients import HttpClient

        return HttpClient(url, api_key, model)
    from edgellm.cli.chat_clients import InProcessClient
    from edgellm.cli.loading import has_chat_template, load_llm

    name = model or DEFAULT_MODEL
    # the kernels load after the model: while the user types (a terminal), or at their first use
    # (piped input, one answer, as `generate` does)
    llm = load_llm(name, {**engine, "warmup": False})
    if not has_chat_template(llm):
        raise click.UsageError(f"{name} has no chat template; use `edgellm generate --raw` for plain completion")
    warmed = llm.engine.config.warmup  # a first run compiled every kernel while loading
    return InProcessClient(llm, name, warm_up=sys.stdin.isatty() and not warmed)


def answer_piped(client: Any, session: Any) -> None:
    """All of stdin is one user message (as `ollama run` takes piped input); the answer goes to stdout."""
    from edgellm.cli.chat_turn import stream_answer

    text = sys.stdin.read()
    if not text.strip():
        raise click.UsageError("stdin is empty: pipe a message in, or run `edgellm chat` in a terminal")

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    answer = stream_answer(client, session.begin_turn(text.strip()), session.settings, write)
    if not answer.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if answer.interrupted:
        raise click.exceptions.Exit(130)


@click.command("chat")
@click.argument("model", required=False, type=MODEL)
@click.option("--system", default=None, help="System prompt (change it later with /system).")
@click.option("--url", default=None, metavar="URL",
              help="Talk to a running `edgellm serve` (or any OpenAI-compatible server) at URL "
                   "instead of loading the model here.")
@click.option("--api-key", envvar="EDGELLM_API_KEY", default=None, help="API key for --url ($EDGELLM_API_KEY).")
@click.option("--history-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where input lines are remembered (default: <cache root>/chat_history).")
@chat_sampling_options
@engine_options
def chat_command(model: str | None, system: str | None, url: str | None, api_key: str | None,
                 history_file: Path | None, sampling: dict[str, Any], engine: dict[str, Any]) -> None:
    """Chat with MODEL (default: smollm2-135m-instruct) through its chat template.

    Answers stream as they are generated; Ctrl-C stops one; /help lists commands (/set, /system,
    /save, /load, /stats, /clear, /exit). With stdin not a terminal, all of stdin is one message and
    the answer is printed, for scripts:

    \b
      echo "What is the capital of France?" | edgellm chat
    """
    from edgellm.cli.chat_session import ChatSession, SettingError

    if url and engine:
        raise click.UsageError(f"--url talks to a server: engine options ({', '.join(engine)}) do not apply")
    session = ChatSession(system=system)
    try:
        for key, value in sampling.items():
            session.set(key, str(value))
    except SettingError as e:
        raise click.BadParameter(str(e)) from None
    client = make_client(model, url, api_key, engine)
    if not sys.stdin.isatty():
        answer_piped(client, session)
    else:
        from edgellm.cli.chat_repl import run_repl

        run_repl(client, session, history_file or default_history_file())
    quick_exit.request()
