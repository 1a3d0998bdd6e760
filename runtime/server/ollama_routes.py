"""Ollama-compatible routes: ``/api/chat``, ``/api/generate`` (NDJSON streams), ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version``. Durations are nanoseconds; errors are ``{"error": "..."}``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

import edgellm
from edgellm.outputs import RequestOutput
from edgellm.sampling_params import SamplingParams
from edgellm.server.context import Ctx, ServerContext
from edgellm.server.errors import APIError, bad_input
from edgellm.server.generation import new_id, start, until_disconnect
from edgellm.server.model_card import ModelCard
from edgellm.server.ollama_protocol import (
    OllamaAssistantMessage,
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaModel,
    OllamaModelDetails,
    OllamaOptions,
    OllamaPs,
    OllamaRequestBase,
    OllamaRunningModel,
    OllamaShow,
    OllamaShowRequest,
    OllamaTags,
    OllamaVersion,
)
from edgellm.server.prompts import chat_prompt_ids
from edgellm.server.streaming import ndjson, ndjson_response

logger = logging.getLogger(__name__)

router = APIRouter(tags=["ollama"])


class JsonBodyMiddleware:
    """Read ``/api/*`` bodies as JSON whatever their content type, as Ollama does.

    Ollama's own examples are ``curl .../api/generate -d '{...}'``, which sends
    ``application/x-www-form-urlencoded``; FastAPI would not parse that as JSON.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)

_NDJSON_DOC = {200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                     "description": "NDJSON lines while `stream` is true (the default), else one JSON object"}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


def _stats(out: RequestOutput) -> dict[str, Any]:
    """Ollama's timing fields of a finished request."""
    m, c = out.metrics, out.outputs[0]
    first = m.first_token_time or m.arrival_time
    return {
        "done_reason": c.finish_reason,
        "total_duration": _ns((m.finished_time or time.time()) - m.arrival_time),
        "load_duration": 0,  # the model was loaded when the server started
        "prompt_eval_count": out.usage.prompt_tokens,
        "prompt_eval_duration": _ns(first - (m.first_scheduled_time or m.arrival_time)),
        "eval_count": out.usage.completion_tokens,
        "eval_duration": _ns((m.last_token_time or first) - first),
    }


def _check(card: ModelCard, body: OllamaRequestBase) -> None:
    if not card.matches(body.model):
        raise APIError(404, f"model '{body.model}' not found")
    if body.format not in (None, ""):
        raise APIError(400, "format (JSON mode / schemas) is not supported: this server has no constrained "
                       "decoding; ask for JSON in the prompt instead", param="format")
    if body.think not in (None, False):
        raise APIError(400, f"'{body.model}' does not support thinking", param="think")


def _params(body: OllamaRequestBase) -> SamplingParams:
    try:
        return (body.options or OllamaOptions()).to_sampling_params()
    except ValueError as e:
        raise bad_input(e) from None


async def _run(request: Request, ctx: ServerContext, body: OllamaRequestBase, prompt: str | list[int],
               make: Callable[..., Any], done_extra: Callable[[RequestOutput], dict[str, Any]]) -> Response | Any:
    """Run one request; ``make(text, done, **fields)`` builds a response object (chat or generate)."""
    params = _params(body)
    try:
        gens = await until_disconnect(request, start(ctx, [prompt], params, 0, new_id("ollama")))
    except ValueError as e:
        raise bad_input(e, "prompt") from None
    if not body.stream:
        try:
            out = (await until_disconnect(request, gens.finals()))[0]
        finally:
            await gens.aclose()
        return make(out.outputs[0].text, True, **_stats(out), **done_extra(out))

    async def lines() -> AsyncIterator[str]:
        try:
            async for _, out in gens.outputs():
                c = out.outputs[0]
                if c.delta_text:
                    yield ndjson(make(c.delta_text, False))
                if out.finished:
                    yield ndjson(make("", True, **_stats(out), **done_extra(out)))
        except Exception as e:
            logger.exception("ollama stream failed")
            yield ndjson({"error": f"generation failed ({type(e).__name__}: {e})"})
        finally:
            await gens.aclose()

    return ndjson_response(lines())


def _load_response(body: OllamaRequestBase) -> dict[str, Any]:
    """What Ollama answers to a request without input: the model is (already) loaded."""
    unload = body.keep_alive in (0, "0", "0s", "0m")
    if unload:
        logger.info("keep_alive=0 asks to unload %s; this server keeps its one model loaded", body.model)
    return {"model": body.model, "created_at": _now(), "done": True, "done_reason": "unload" if unload else "load"}


@router.post("/api/chat", response_model=OllamaChatResponse, response_model_exclude_none=True,
             responses=_NDJSON_DOC)
async def ollama_chat(body: OllamaChatRequest, request: Request,
                      ctx: Ctx) -> Any:
    """Chat (Ollama): streams NDJSON unless ``"stream": false``."""
    _check(ctx.card, body)
    if body.tools:
        raise APIError(400, f"'{body.model}' does not support tools", param="tools")
    if not body.messages:
        return {**_load_response(body), "message": {"role": "assistant", "content": ""}}
    for i, m in enumerate(body.messages):
        if m.images:
            raise APIError(400, f"messages[{i}].images: this model does not take images")
    ids = chat_prompt_ids(ctx.engine.tokenizer, [{"role": m.role, "content": m.content} for m in body.messages])

    def make(text: str, done: bool, **fields: Any) -> OllamaChatResponse:
        return OllamaChatResponse(model=body.model, created_at=_now(), done=done,
                                  message=OllamaAssistantMessage(content=text), **fields)

    return await _run(request, ctx, body, ids, make, lambda out: {})


@router.post("/api/generate", response_model=OllamaGenerateResponse, response_model_exclude_none=True,
             responses=_NDJSON_DOC)
async def ollama_generate(body: OllamaGenerateRequest, request: Request,
                          ctx: Ctx) -> Any:
    """Completion (Ollama): the prompt goes through the chat template unless ``raw``."""
    _check(ctx.card, body)
    if body.images:
        raise APIError(400, "images: this model does not take images", param="images")
    if body.template:
        raise APIError(400, "template (Go templates) is not supported; send a formatted prompt with raw=true",
                       param="template")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if not body.prompt and not body.context:
        return {**_load_response(body), "response": ""}
    tok = ctx.engine.tokenizer
    if body.raw:
        prompt: str | list[int] = body.prompt if not body.context else (
            list(body.context) + list(tok.encode(body.prompt, add_special_tokens=False)))
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}]
        prompt = list(body.context or []) + chat_prompt_ids(tok, messages, param="prompt")

    def make(text: str, done: bool, **fields: Any) -> OllamaGenerateResponse:
        return OllamaGenerateResponse(model=body.model, created_at=_now(), done=done, response=text, **fields)

    return await _run(request, ctx, body, prompt, make,
                      lambda out: {"context": out.prompt_token_ids + out.outputs[0].token_ids})


# -- model facts ---------------------------------------------------------------------------------
def _details(card: ModelCard) -> OllamaModelDetails:
    fmt = "gguf" if card.path and card.path.endswith(".gguf") else "safetensors"
    return OllamaModelDetails(format=fmt, family=card.family, families=[card.family] if card.family else [],
                              parameter_size=card.parameter_size, quantization_level=card.quantization)


def _modified(card: ModelCard) -> str:
    if card.path and Path(card.path).exists():
        return _iso(Path(card.path).stat().st_mtime)
    return _iso(card.created)


@router.get("/api/tags", response_model=OllamaTags)
async def ollama_tags(ctx: Ctx) -> OllamaTags:
    """The models this server has: just the one it serves."""
    c = ctx.card
    return OllamaTags(models=[OllamaModel(name=c.id, model=c.id, modified_at=_modified(c), size=c.size,
                                          digest=c.digest, details=_details(c))])


@router.get("/api/ps", response_model=OllamaPs)
async def ollama_ps(ctx: Ctx) -> OllamaPs:
    """Loaded models: the served one, loaded until the server stops."""
    c = ctx.card
    on_gpu = str(ctx.settings.engine_options.get("device", "cpu")) not in ("cpu", "auto", "torch")
    expires = _iso(time.time() + timedelta(days=365 * 100).total_seconds())
    return OllamaPs(models=[OllamaRunningModel(name=c.id, model=c.id, size=c.size, digest=c.digest,
                                               details=_details(c), expires_at=expires,
                                               size_vram=c.size if on_gpu else 0,
                                               context_length=c.max_model_len)])


@router.post("/api/show", response_model=OllamaShow)
async def ollama_show(body: OllamaShowRequest, ctx: Ctx) -> OllamaShow:
    """Details of a model: template, shape (``model_info``), capabilities."""
    c, name = ctx.card, body.model or body.name
    if not name:
        raise APIError(400, "model is required", param="model")
    if not c.matches(name):
        raise APIError(404, f"model '{name}' not found")
    fam, cfg = c.family or "llama", c.config
    info = {"general.architecture": fam, f"{fam}.context_length": c.max_model_len}
    for key, field in [("embedding_length", "hidden_size"), ("block_count", "num_layers"),
                       ("feed_forward_length", "intermediate_size"), ("attention.head_count", "num_heads"),
                       ("attention.head_count_kv", "num_kv_heads"), ("rope.freq_base", "rope_theta"),
                       ("vocab_size", "vocab_size")]:
        if field in cfg:
            info[f"{fam}.{key}"] = cfg[field]
    return OllamaShow(modelfile=f"FROM {c.path or c.root}\n", parameters="", template=c.chat_template,
                      details=_details(c), model_info=info, modified_at=_modified(c),
                      capabilities=["completion"])


@router.get("/api/version", response_model=OllamaVersion)
async def ollama_version() -> OllamaVersion:
    return OllamaVersion(version=edgellm.__version__)
