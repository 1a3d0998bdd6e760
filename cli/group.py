"""A click group that imports a subcommand only when it runs, and reports errors in one line.

Listing commands in ``--help`` uses the short help written in the table, so ``edgellm --help``
imports no command module at all (and so no torch). A command whose module is missing from this
build (an optional one, such as ``bench``) is simply not offered.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass

import click

from edgellm.cli.errors import VERBOSE_KEY, one_line

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LazyCommand:
    """Where a subcommand lives (``module:attribute``) and its one-line help."""

    target: str
    short_help: str
    optional: bool = False  # provided by a module that may be absent from this build

    @property
    def module(self) -> str:
        return self.target.split(":")[0]


class LazyGroup(click.Group):
    """``click.Group`` over a table of ``LazyCommand``; turns unexpected exceptions into one line."""

    def __init__(self, *args, lazy: dict[str, LazyCommand], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def _present(self, name: str) -> bool:
        entry = self.lazy[name]
        if not entry.optional:
            return True
        try:
            return importlib.util.find_spec(entry.module) is not None
        except ModuleNotFoundError:
            return False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in self.lazy if self._present(n)] + sorted(set(self.commands) - set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        entry = self.lazy.get(cmd_name)
        if entry is None or not self._present(cmd_name):
            return None
        module_name, attr = entry.target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if entry.optional and e.name == module_name:
                return None
            raise
        command = getattr(module, attr)
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name].short_help if name in self.lazy else
                 self.commands[name].get_short_help_str()) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # `edgellm generate ... | head`: the reader left; nothing to report, and nothing more to flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(141) from None
        except Exception as e:
            if ctx.meta.get(VERBOSE_KEY, 0):
                raise
            raise click.ClickException(one_line(e)) from None
