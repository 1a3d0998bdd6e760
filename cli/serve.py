"""``edgellm serve``: an OpenAI- and Ollama-compatible HTTP server for one model."""
from __future__ import annotations

import logging
import sys

import click

from edgellm.cli.options import SPECULATIVE_HELP, SPECULATIVE_SEQS_HELP, MemorySize
from edgellm.server.settings import ServerSettings


def _origins(text: str) -> list[str]:
    return [o.strip().rstrip("/") for o in text.split(",") if o.strip()]


@click.command("serve")
@click.argument("model", default="smollm2-135m-instruct")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EDGELLM_API_KEY", help="require 'Authorization: Bearer KEY' "
              "(also from $EDGELLM_API_KEY); /health stays open")
@click.option("--allowed-origins", default="", metavar="ORIGINS",
              help="comma list of browser origins allowed by CORS, e.g. http://localhost:3000 (or *)")
@click.option("--max-queue", type=click.IntRange(min=0), default=0, show_default=True,
              help="most generation requests in flight; more get 429 with Retry-After (0: no limit)")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="seconds in-flight requests may take to finish after SIGTERM/SIGINT")
@click.option("--served-model-name", help="the model name clients use (default: MODEL)")
@click.option("--max-model-len", type=click.IntRange(min=1), help="context length (default: the model's)")
@click.option("--kv-cache-memory", type=MemorySize(), help="KV cache size: bytes (2GiB) or fraction of free")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "rocm", "xpu", "torch"]), default="auto",
              show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores)")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "float32", "bfloat16", "int8"]), default="auto",
              show_default=True, help="K/V cache dtype; bfloat16 halves its memory, int8 (per-row scales) "
                                      "takes 0.53x bf16's and speeds up batched decode")
@click.option("--kv-page-in", type=click.Choice(["idle", "lazy"]), default="idle", show_default=True,
              help="idle: page the KV cache's memory in while no request runs, so the first burst of "
                   "load does not pay for it; lazy: only as requests need it (less memory when lightly used)")
@click.option("--batch-invariant", is_flag=True, default=None,
              help="same output for a request alone or among others, at some cost in speed")
@click.option("--max-num-seqs", type=click.IntRange(min=1), help="most sequences in one step (default: 256)")
@click.option("--num-speculative-tokens", type=click.IntRange(min=0), metavar="K", help=SPECULATIVE_HELP)
@click.option("--speculative-max-seqs", type=click.IntRange(min=1), metavar="N", help=SPECULATIVE_SEQS_HELP)
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1),
              help="token budget of one step, prompt chunks and decodes together (default: 2048; 512 on CPUs without AMX)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve_command(model: str, host: str, port: int, api_key: str | None, allowed_origins: str,
                  max_queue: int, drain_timeout: float, served_model_name: str | None,
                  max_model_len: int | None, kv_cache_memory: float | None, device: str, dtype: str,
                  threads: int | None, kv_cache_dtype: str, kv_page_in: str, batch_invariant: bool | None,
                  max_num_seqs: int | None, num_speculative_tokens: int | None, speculative_max_seqs: int | None,
                  max_num_batched_tokens: int | None, log_level: str) -> None:
    """Serve MODEL (a catalog name, a .gguf file or a Hugging Face folder) over HTTP.

    OpenAI routes under /v1 (models, completions, chat/completions), Ollama routes under /api,
    plus /health, /metrics, /tokenize, /detokenize, /version and /docs.

        edgellm serve smollm2-135m-instruct --port 8000 --max-queue 64
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_options = {"max_model_len": max_model_len, "kv_cache_memory": kv_cache_memory, "device": device,
                      "dtype": dtype, "threads": threads, "kv_cache_dtype": kv_cache_dtype,
                      "kv_page_in": kv_page_in, "batch_invariant": batch_invariant, "max_num_seqs": max_num_seqs,
                      "max_num_batched_tokens": max_num_batched_tokens,
                      "num_speculative_tokens": num_speculative_tokens,
                      "speculative_max_seqs": speculative_max_seqs}
    settings = ServerSettings(
        model=model, host=host, port=port, served_model_name=served_model_name, api_key=api_key or None,
        allowed_origins=_origins(allowed_origins), max_queue=max_queue or None, drain_timeout=drain_timeout,
        log_level=log_level, engine_options={k: v for k, v in engine_options.items() if v is not None},
    )
    from edgellm.async_llm import AsyncLLM
    from edgellm.cli.loading import FIRST_RUN, first_run
    from edgellm.server.run import serve_engine

    click.echo(f"loading {model} ...{f' ({FIRST_RUN})' if first_run(settings.engine_options) else ''}", err=True)
    try:
        engine = AsyncLLM(model, **settings.engine_options)
    except Exception as e:
        logging.getLogger(__name__).debug("load failed", exc_info=True)
        raise click.ClickException(f"cannot load {model}: {e}") from e
    try:
        code = serve_engine(engine, settings)
    finally:
        engine.shutdown()
    sys.exit(code)


if __name__ == "__main__":  # python -m edgellm.cli.serve MODEL [OPTIONS]
    serve_command()
