"""``edgellm generate PROMPT``: stream one completion to stdout."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import click

from edgellm.cli import quick_exit
from edgellm.cli.options import DEFAULT_MODEL, MODEL, engine_options, sampling_options


def read_prompt(prompt: str) -> str:
    """``prompt`` itself, or all of stdin when it is ``-``."""
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise click.UsageError("the prompt is empty")
    return text


def build_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    """The one-turn conversation for ``--chat``."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


@click.command("generate")
@click.argument("prompt")
@click.option("-m", "--model", type=MODEL, default=DEFAULT_MODEL, show_default=True,
              help="Catalog name, .gguf file, model folder or Hugging Face repo id.")
@click.option("--chat/--raw", "use_chat", default=None,
              help="Apply the model's chat template, or send the prompt as is "
                   "(default: --chat when the model has a template, as instruct models do).")
@click.option("--system", default=None, help="System prompt (with --chat).")
@click.option("--stats", is_flag=True, help="After the text, print tokens, TTFT and tokens/s to stderr.")
@sampling_options
@engine_options
def generate_command(prompt: str, model: str, use_chat: bool | None, system: str | None, stats: bool,
                     sampling: dict[str, Any], engine: dict[str, Any]) -> None:
    """Complete PROMPT, streaming the text to stdout as it is generated. PROMPT `-` reads stdin.

    \b
      edgellm generate "Write a haiku about the sea"
      edgellm generate --raw --temperature 0 "The capital of France is"
      cat question.txt | edgellm generate -
    """
    from edgellm.cli.loading import has_chat_template, load_llm
    from edgellm.sampling_params import SamplingParams

    text = read_prompt(prompt)
    params = SamplingParams(**sampling)  # bad values fail here, before the model loads
    if system and use_chat is False:
        raise click.UsageError("--system needs --chat")
    llm = load_llm(model, {"warmup": False, **engine})  # one request: load only the kernels it uses
    if use_chat is None:
        use_chat = has_chat_template(llm)
    if system and not use_chat:
        raise click.UsageError(f"{model} has no chat template, so --system cannot be used")
    start = time.perf_counter()
    deltas = llm.chat(build_messages(text, system), params, stream=True) if use_chat else llm.stream(text, params)
    first, tokens, ended_with_newline = None, 0, True
    out = sys.stdout
    with contextlib.closing(deltas):
        for delta in deltas:
            if delta.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(delta.token_ids)
            if delta.text:
                out.write(delta.text)
                out.flush()
                ended_with_newline = delta.text.endswith("\n")
    if not ended_with_newline:
        out.write("\n")
    if stats:
        elapsed = time.perf_counter() - start
        rate = (tokens - 1) / (elapsed - (first - start)) if first and tokens > 1 and elapsed > first - start else 0
        ttft = f"{first - start:.2f} s" if first else "n/a"
        click.secho(f"{tokens} tokens, TTFT {ttft}, {rate:.1f} tokens/s", err=True, dim=True)
    quick_exit.request()
