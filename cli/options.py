"""Options shared by several commands, each set declared once.

``engine_options`` adds the engine knobs (``--device``, ``--dtype``, ``--threads``,
``--max-model-len``, ``--kv-cache-memory``) and hands the command one ``engine`` dict of the ones
given, ready for ``LLM(model, **engine)``. ``sampling_options`` does the same for sampling knobs
(``sampling`` dict, ready for ``SamplingParams(**sampling)``). Nothing here imports the engine.

>>> @click.command()
... @engine_options
... def run(engine: dict) -> None:
...     print(engine)
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click

DEFAULT_MODEL = "smollm2-135m-instruct"  # the same as edgellm.catalog.DEFAULT_MODEL, without importing it

DEVICES = ("auto", "cpu", "cuda", "rocm", "xpu", "torch")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SPECULATIVE_HELP = ("Speculative decoding by prompt lookup: up to K draft tokens a step for greedy requests, "
                    "copied from where the last 2-4 tokens occurred earlier in the prompt or output and "
                    "verified in the same step; the tokens stay the model's argmax. 0 turns it off (default: "
                    "the backend's, 2 on CPUs with AMX or AVX512-BF16 and 2+ threads).")
SPECULATIVE_SEQS_HELP = "Draft only while at most N sequences run (default: the backend's, 2 on the CPU)."

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class MemorySize(click.ParamType):
    """A byte count (``2GiB``, ``512M``, ``1073741824``) or a fraction of free memory (``0.5``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        if isinstance(value, (int, float)):
            return value
        match = _SIZE.match(str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            self.fail(f"{value!r} is not a size: use bytes with an optional unit (512MiB, 2G) "
                      "or a fraction of free memory (0.5)", param, ctx)
        number = float(match.group(1))
        if not unit and "." in match.group(1):
            if not 0 < number <= 1:
                self.fail(f"a fraction of free memory must be in (0, 1], got {value}", param, ctx)
            return number
        size = int(number * _UNITS[unit])
        if size <= 0:
            self.fail("must be more than 0 bytes", param, ctx)
        return size


class ModelName(click.ParamType):
    """A catalog name, alias, .gguf path, model folder or Hugging Face repo id; completes catalog names."""

    name = "model"

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
        from click.shell_completion import CompletionItem

        from edgellm.catalog import CATALOG

        names = [n for e in CATALOG.values() for n in (e.name, *e.aliases)]
        return [CompletionItem(n) for n in names if n.startswith(incomplete)] or [
            CompletionItem(incomplete, type="file")]


MODEL = ModelName()


def _collect(func: Callable, key: str, names: tuple[str, ...], options: list[Callable]) -> Callable:
    """Wrap ``func`` so the options ``names`` arrive as one dict ``key`` holding those that were given."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in names}
        kwargs[key] = {name: list(value) if isinstance(value, tuple) else value
                       for name, value in given.items() if value is not None and value != ()}
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


_ENGINE = [
    click.option("--device", type=click.Choice(DEVICES), default=None,
                 help="Backend to run on (default: auto, the best one present)."),
    click.option("--dtype", type=click.Choice(DTYPES), default=None,
                 help="Activation dtype (default: auto, the backend's choice)."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads (default: physical cores; also $EDGELLM_THREADS)."),
    click.option("--max-model-len", type=click.IntRange(min=16), default=None,
                 help="Context length in tokens (default: the model's)."),
    click.option("--kv-cache-memory", type=MemorySize(), default=None,
                 help="KV cache size: bytes (2GiB, 512M) or a fraction of free memory (0.3)."),
    click.option("--kv-cache-dtype", type=click.Choice(["auto", "float32", "bfloat16", "int8"]), default=None,
                 help="K/V cache dtype (default: auto, what the k/v projections produce: bfloat16 for "
                      "packed GGUF weights on the CPU, else the model dtype). int8 keeps each row's codes and "
                      "scale: 0.53x bf16's memory, faster batched decode, K/V rounded to 1/254 of their row's max."),
    click.option("--batch-invariant", is_flag=True, default=None,
                 help="Same output for a request alone or in any batch, at some cost in speed "
                      "(also $EDGELLM_BATCH_INVARIANT=1)."),
    click.option("--num-speculative-tokens", type=click.IntRange(min=0), default=None, metavar="K",
                 help=SPECULATIVE_HELP),
    click.option("--speculative-max-seqs", type=click.IntRange(min=1), default=None, metavar="N",
                 help=SPECULATIVE_SEQS_HELP),
]
ENGINE_KEYS = ("device", "dtype", "threads", "max_model_len", "kv_cache_memory", "kv_cache_dtype",
               "batch_invariant", "num_speculative_tokens", "speculative_max_seqs")


def engine_options(func: Callable) -> Callable:
    """Add the engine options; the command gets ``engine: dict`` with those given."""
    return _collect(func, "engine", ENGINE_KEYS, _ENGINE)


_SAMPLING = [
    click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                 help="Most tokens to generate."),
    click.option("--temperature", type=click.FloatRange(min=0), default=None,
                 help="Sampling temperature; 0 is greedy."),
    click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
                 help="Nucleus sampling: smallest set of tokens with this total probability."),
    click.option("--top-k", type=click.IntRange(min=-1), default=None,
                 help="Sample from the k most likely tokens; 0 or -1 is off."),
    click.option("--seed", type=int, default=None, help="Random seed, for repeatable samples."),
    click.option("--stop", multiple=True, metavar="TEXT",
                 help="Stop when this text is generated (repeatable)."),
]
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def sampling_options(func: Callable) -> Callable:
    """Add the sampling options; the command gets ``sampling: dict`` with those given."""
    return _collect(func, "sampling", SAMPLING_KEYS, _SAMPLING)


def chat_sampling_options(func: Callable) -> Callable:
    """The sampling options without ``--stop`` (a chat stops at the end of the model's turn)."""
    return _collect(func, "sampling", SAMPLING_KEYS[:-1], _SAMPLING[:-1])
