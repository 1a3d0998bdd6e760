"""``edgellm bench``: latency (like llama-bench), offline throughput, and serving load."""
from __future__ import annotations

import json
from dataclasses import asdict

import click

from edgellm.cli.options import SPECULATIVE_HELP, SPECULATIVE_SEQS_HELP


def _engine(model: str, **opts):
    from edgellm.config import EngineConfig
    from edgellm.engine import LLMEngine

    opts = {k: v for k, v in opts.items() if v is not None}
    return LLMEngine(EngineConfig(model=model, enable_prefix_caching=False, **opts))


def _model_path(model: str) -> str:
    from edgellm.catalog import resolve_model

    return str(resolve_model(model))


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


_TEMPERATURE = "0: greedy, as llama-bench; above 0 every token is sampled from the full logits (chat's default: 0.7)."


def _speculation(engine) -> tuple[str, str]:
    """The table's row on speculative decoding: its setting and how the run's drafts fared."""
    if engine.proposer is None:
        return "speculative", "off"
    return "speculative", (f"{engine.proposer.num_tokens} drafts a step while at most {engine.spec_max_seqs} run: "
                           f"{engine.spec_accepted_tokens} of {engine.spec_draft_tokens} accepted")


def _greedy_only(which: str, temperature: float) -> None:
    if which == "hf" and temperature > 0:
        raise click.UsageError("--engine hf measures greedy generate() only: leave --temperature at 0")


_engine_options = [
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, rocm, xpu or torch."),
    click.option("--dtype", default="auto", show_default=True, help="Activation dtype."),
    click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores)."),
    click.option("--batch-invariant", is_flag=True, default=None,
                 help="Measure the batch-invariant arithmetic (same outputs alone or batched)."),
    click.option("--kv-cache-dtype", type=click.Choice(["auto", "float32", "bfloat16", "int8"]), default=None,
                 help="K/V cache dtype (default: auto; int8 keeps per-row scales)."),
    click.option("--num-speculative-tokens", type=click.IntRange(min=0), default=None, metavar="K",
                 help=SPECULATIVE_HELP),
    click.option("--speculative-max-seqs", type=click.IntRange(min=1), default=None, metavar="N",
                 help=SPECULATIVE_SEQS_HELP),
]


def engine_options(f):
    for opt in reversed(_engine_options):
        f = opt(f)
    return f


@click.group("bench")
def bench_group() -> None:
    """Measure speed: latency, throughput, or a running server under load."""


@bench_group.command("latency")
@click.argument("model", default="smollm2-135m-instruct")
@click.option("-p", "--prompt-tokens", default=512, show_default=True)
@click.option("-n", "--output-tokens", default=128, show_default=True)
@click.option("-r", "--repetitions", default=3, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help=_TEMPERATURE)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--engine", "which", type=click.Choice(["edgellm", "hf"]), default="edgellm", show_default=True,
              help="hf: the Hugging Face transformers baseline on the same weights and prompts.")
@engine_options
def latency_cmd(model, prompt_tokens, output_tokens, repetitions, temperature, as_json, which, device, dtype,
                threads, batch_invariant, kv_cache_dtype, num_speculative_tokens, speculative_max_seqs):
    """Prefill and decode tokens/s for one stream (like llama-bench's pp/tg)."""
    from edgellm.benchmark import latency, random_prompt

    _greedy_only(which, temperature)
    engine = _engine(model, device=device, dtype=dtype if which == "edgellm" else "auto", threads=threads,
                     batch_invariant=batch_invariant, kv_cache_dtype=kv_cache_dtype,
                     max_num_batched_tokens=max(2048, prompt_tokens), max_num_seqs=4,
                     num_speculative_tokens=num_speculative_tokens, speculative_max_seqs=speculative_max_seqs)
    if which == "hf":
        from edgellm.benchmark_hf import hf_latency, load_hf

        hf = load_hf(_model_path(model), "float32" if dtype == "auto" else dtype)
        r = hf_latency(hf, random_prompt(engine, prompt_tokens, 0), output_tokens, repetitions)
        name, backend = f"transformers {dtype if dtype != 'auto' else 'float32'}", "hf"
    else:
        r = latency(engine, prompt_tokens, output_tokens, repetitions, temperature=temperature)
        name, backend = engine.model_name, engine.backend.name
        spec = _speculation(engine)
    if as_json:
        click.echo(json.dumps({"model": name, "backend": backend, "threads": engine.backend.threads,
                               **asdict(r)}, indent=2))
        return
    click.echo(_table([
        ("model", f"{name} ({backend}, {engine.backend.threads} threads)"),
        (f"prefill pp{prompt_tokens}", f"{r.prefill_tok_s:8.1f} tok/s ± {r.prefill_tok_s_sd:.1f}"),
        (f"decode tg{output_tokens}" + (f" (temperature {temperature:g})" if temperature else ""),
         f"{r.decode_tok_s:8.1f} tok/s ± {r.decode_tok_s_sd:.1f}"),
        ("TTFT / TPOT", f"{r.ttft_ms:.1f} ms / {r.tpot_ms:.2f} ms"),
        *([spec] if which == "edgellm" else []),
    ]))


@bench_group.command("throughput")
@click.argument("model", default="smollm2-135m-instruct")
@click.option("--prompts", "prompts_path", type=click.Path(exists=True), default=None,
              help="loadgen JSONL (default: random 256-token prompts).")
@click.option("--num-prompts", default=64, show_default=True)
@click.option("--offset", default=0, show_default=True)
@click.option("-n", "--output-tokens", default=128, show_default=True)
@click.option("--max-num-seqs", default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help=_TEMPERATURE)
@click.option("--json", "as_json", is_flag=True)
@click.option("--engine", "which", type=click.Choice(["edgellm", "hf"]), default="edgellm", show_default=True,
              help="hf: transformers generate() in static batches of --max-num-seqs.")
@engine_options
def throughput_cmd(model, prompts_path, num_prompts, offset, output_tokens, max_num_seqs, temperature, as_json,
                   which, device, dtype, threads, batch_invariant, kv_cache_dtype, num_speculative_tokens,
                   speculative_max_seqs):
    """Offline batch: every prompt submitted at once, tokens/s until all finish."""
    from edgellm.benchmark import load_prompts, random_prompt, throughput

    _greedy_only(which, temperature)
    engine = _engine(model, device=device, dtype=dtype, threads=threads, max_num_seqs=max_num_seqs,
                     batch_invariant=batch_invariant, kv_cache_dtype=kv_cache_dtype,
                     num_speculative_tokens=num_speculative_tokens, speculative_max_seqs=speculative_max_seqs)
    if prompts_path:
        prompts = load_prompts(prompts_path, engine, num_prompts, offset)
    else:
        prompts = [random_prompt(engine, 256, i) for i in range(num_prompts)]
    if which == "hf":
        from edgellm.benchmark_hf import hf_throughput, load_hf

        hf = load_hf(_model_path(model), "float32" if dtype == "auto" else dtype)
        pad = engine.tokenizer.pad_token_id or 0
        r = hf_throughput(hf, prompts, output_tokens, max_num_seqs, pad)
    else:
        r = throughput(engine, prompts, output_tokens, temperature=temperature)
        spec = _speculation(engine)
    if as_json:
        click.echo(json.dumps(asdict(r), indent=2))
        return
    click.echo(_table([
        ("requests", f"{r.requests} ({r.prompt_tokens} prompt + {r.output_tokens} output tokens)"),
        ("elapsed", f"{r.elapsed_s:.2f} s"),
        ("throughput", f"{r.requests_per_s:.2f} req/s, {r.output_tok_s:.1f} output tok/s, "
                       f"{r.total_tok_s:.1f} total tok/s"),
        ("sampling", f"temperature {temperature:g}" if temperature else "greedy"),
        *([spec] if which == "edgellm" else []),
    ]))


@bench_group.command("serve")
@click.option("--url", required=True, help="Base URL of an OpenAI-compatible server.")
@click.option("--model", default="default", show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(exists=True), required=True,
              help="loadgen JSONL (e.g. shared/bench/prompts.jsonl).")
@click.option("--concurrency", "-c", default=8, show_default=True)
@click.option("--requests", default=64, show_default=True)
@click.option("--offset", default=0, show_default=True, help="First prompt (fresh ones avoid prefix hits).")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--ignore-eos", is_flag=True)
@click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="chat", show_default=True)
@click.option("--api-key", default=None)
@click.option("--json", "as_json", is_flag=True)
def serve_cmd(url, model, prompts_path, concurrency, requests, offset, max_tokens, temperature, ignore_eos,
              endpoint, api_key, as_json):
    """Load a running server the way loadgen does: TTFT, TPOT, ITL, output tokens/s."""
    from edgellm.benchmark_serve import serve_benchmark

    s = serve_benchmark(url, prompts_path, model, concurrency, requests, offset, max_tokens, temperature,
                        ignore_eos, api_key, endpoint == "chat")
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(_table([
        ("requests", f"{s['completed']}/{s['requests']} ok, concurrency {s['concurrency']}"),
        ("output", f"{s['output_tok_per_s']} tok/s ({s['output_tokens']} tokens in {s['wall_s']} s)"),
        ("TTFT p50/p90/p99", "{p50} / {p90} / {p99} ms".format(**s["ttft_ms"])),
        ("TPOT p50/p90/p99", "{p50} / {p90} / {p99} ms".format(**s["tpot_ms"])),
        ("errors", "; ".join(s["errors"]) or "none"),
    ]))
    if s["failed"]:
        raise SystemExit(1)
