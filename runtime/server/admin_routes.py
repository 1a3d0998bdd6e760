"""Service routes: ``/health``, ``/version``, ``/metrics``, and vLLM's ``/tokenize`` and ``/detokenize``."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

import edgellm
from edgellm.server.context import Ctx
from edgellm.server.errors import APIError
from edgellm.server.prompts import chat_prompt_ids, openai_messages
from edgellm.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)

router = APIRouter()


@router.get("/health", tags=["service"], responses={503: {"description": "draining for shutdown"}})
async def health() -> Response:
    """200 while the server takes requests (503 once it drains: the gate answers that)."""
    return Response(status_code=200)


@router.get("/version", response_model=VersionResponse, tags=["service"])
async def version() -> VersionResponse:
    return VersionResponse(version=edgellm.__version__)


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(ctx: Ctx) -> Response:
    """Prometheus metrics; engine gauges are read at scrape time."""
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)


@router.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, ctx: Ctx) -> TokenizeResponse:
    """Token ids of ``prompt``, or of ``messages`` rendered by the chat template."""
    ctx.card.check(body.model)
    tok = ctx.engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        ids = chat_prompt_ids(tok, openai_messages(body.messages), body.add_generation_prompt)
    elif body.add_special_tokens:
        from edgellm.tokenizer import encode_prompt

        ids = list(encode_prompt(tok, body.prompt))
    else:
        ids = list(tok.encode(body.prompt, add_special_tokens=False))
    strs = list(tok.convert_ids_to_tokens(ids)) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.card.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, ctx: Ctx) -> DetokenizeResponse:
    """Text of token ids."""
    ctx.card.check(body.model)
    vocab = len(ctx.engine.tokenizer)
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise APIError(400, f"tokens: ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=ctx.engine.tokenizer.decode(body.tokens))
