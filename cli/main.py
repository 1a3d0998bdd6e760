"""``edgellm``: the command line. Thin: parse, call the API, print.

Subcommands are imported when run, so ``edgellm --help``, ``list`` and ``pull`` never import torch.
"""
from __future__ import annotations

import logging

import click

from edgellm import __version__
from edgellm.cli.errors import VERBOSE_KEY
from edgellm.cli.group import LazyCommand, LazyGroup

COMMANDS: dict[str, LazyCommand] = {
    "chat": LazyCommand("edgellm.cli.chat:chat_command", "Chat with a model in the terminal, or answer piped input."),
    "generate": LazyCommand("edgellm.cli.generate:generate_command", "Complete one prompt, streaming to stdout."),
    "serve": LazyCommand("edgellm.cli.serve:serve_command", "Serve the OpenAI- and Ollama-compatible HTTP API.",
                         optional=True),
    "bench": LazyCommand("edgellm.cli.bench:bench_group", "Measure throughput and latency.", optional=True),
    "pull": LazyCommand("edgellm.cli.models:pull_command", "Download a model into the cache."),
    "list": LazyCommand("edgellm.cli.models:list_command", "List cached models and the catalog."),
    "rm": LazyCommand("edgellm.cli.models:rm_command", "Remove a model from the cache."),
    "info": LazyCommand("edgellm.cli.info:info_command", "Show the hardware and software edgellm sees."),
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

HELP = """LLM inference for the hardware people actually have.

\b
  edgellm chat                       talk to the default model
  edgellm generate "Once upon a"     stream one completion
  echo "Hi" | edgellm chat           answer piped input, for scripts
  edgellm serve                      OpenAI-compatible API

Models are catalog names (see `edgellm list`), .gguf files, model folders or Hugging Face repo ids.

\b
Shell completion (bash; zsh and fish alike, with zsh_source / fish_source):
  eval "$(_EDGELLM_COMPLETE=bash_source edgellm)"
"""


def configure_logging(verbose: int) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv; to stderr."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


@click.group("edgellm", cls=LazyGroup, lazy=COMMANDS, help=HELP, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="edgellm", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug); errors show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    ctx.meta[VERBOSE_KEY] = verbose
    configure_logging(verbose)


def main() -> None:
    """The console script: ``cli``, then a quick exit where the command asked for one (``quick_exit``)."""
    try:
        cli.main(prog_name="edgellm")
    except SystemExit as e:
        from edgellm.cli import quick_exit

        if not quick_exit.requested():
            raise
        quick_exit.exit_now(e.code)


if __name__ == "__main__":
    main()
