"""OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` on ``AsyncLLM``."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from edgellm.outputs import CompletionOutput, RequestOutput
from edgellm.sampling_params import SamplingParams
from edgellm.server.context import Ctx, ServerContext
from edgellm.server.errors import APIError, bad_input
from edgellm.server.generation import Generations, new_id, start, until_disconnect
from edgellm.server.logprobs import chat_logprobs, completion_logprobs
from edgellm.server.prompts import chat_prompt_ids, openai_messages
from edgellm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCardOut,
    ModelList,
    PromptTokensDetails,
    UsageInfo,
)
from edgellm.server.streaming import SSE_DONE, SplicedEvents, sse, sse_response

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])

_STREAM_DOC = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                     "description": "JSON, or server-sent events when `stream` is true"}}


def usage_of(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(o.usage.prompt_tokens for o in finals)
    completion = sum(o.usage.completion_tokens for o in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=sum(o.usage.cached_tokens for o in finals)))


async def _start(request: Request, ctx: ServerContext, prompts: list[str | list[int]], params: SamplingParams,
                 priority: int, rid: str, param: str) -> Generations:
    try:
        return await until_disconnect(request, start(ctx, prompts, params, priority, rid))
    except ValueError as e:
        raise bad_input(e, param) from None


async def _finals(request: Request, gens: Generations) -> list[RequestOutput]:
    try:
        return await until_disconnect(request, gens.finals())
    finally:
        await gens.aclose()


class _ChoiceTracker:
    """Per-choice progress of a stream: skip outputs that add nothing new, stop after the finish."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def fresh(self, index: int, c: CompletionOutput) -> bool:
        if index in self.done:
            return False
        grew = len(c.token_ids) > self.tokens.get(index, 0)
        self.tokens[index] = len(c.token_ids)
        if c.finish_reason is not None:
            self.done.add(index)
        return grew or c.finish_reason is not None


def _error_event(e: Exception) -> str:
    logger.exception("stream failed")
    return sse(APIError(500, f"generation failed ({type(e).__name__}: {e})").body("/v1"))


# -- models --------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: Ctx) -> ModelList:
    c = ctx.card
    return ModelList(data=[ModelCardOut(id=c.id, created=c.created, root=c.root, max_model_len=c.max_model_len)])


# -- completions ---------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM_DOC)
async def completions(body: CompletionRequest, request: Request,
                      ctx: Ctx) -> CompletionResponse | Response:
    """Text completion for one prompt or a batch (texts or token ids); SSE when ``stream``."""
    ctx.card.check(body.model)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs needs prompt logprobs, which this server does not compute",
                       param="echo")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
    try:
        prompts, params = body.prompts(), body.to_sampling_params()
    except ValueError as e:
        raise bad_input(e, "prompt") from None
    rid = new_id("cmpl")
    gens = await _start(request, ctx, prompts, params, body.priority, rid, "prompt")
    if body.stream:
        return sse_response(_completion_events(ctx, body, gens, rid))
    finals = await _finals(request, gens)
    choices = []
    for i, out in enumerate(finals):
        prefix = _prompt_text(ctx, out) if body.echo else ""
        for c in out.outputs:
            lp = completion_logprobs(c.logprobs or [], len(prefix)) if body.logprobs is not None else None
            choices.append(CompletionChoice(index=i * body.n + c.index, text=prefix + c.text, logprobs=lp,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return CompletionResponse(id=rid, model=ctx.card.id, choices=choices, usage=usage_of(finals))


def _prompt_text(ctx: ServerContext, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return ctx.engine.tokenizer.decode(out.prompt_token_ids)


async def _completion_events(ctx: ServerContext, body: CompletionRequest, gens: Generations,
                             rid: str) -> AsyncIterator[str]:
    created, model = int(time.time()), ctx.card.id
    track, offsets, finals = _ChoiceTracker(), {}, {}
    tokens = SplicedEvents(lambda idx: CompletionResponse(id=rid, created=created, model=model, choices=[
        CompletionChoice(index=idx, text=SplicedEvents.SPLICE)]))
    try:
        async for i, out in gens.outputs():
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                idx = i * body.n + c.index
                first = idx not in track.tokens
                if not track.fresh(idx, c):
                    continue
                text = (_prompt_text(ctx, out) if body.echo and first else "") + c.delta_text
                lp = None
                if body.logprobs is not None:
                    lp = completion_logprobs(c.delta_logprobs or [], offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + len(text)
                if lp is None and c.finish_reason is None:  # a token's text: the common event, spliced
                    yield tokens.event(idx, text)
                    continue
                yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[
                    CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=c.finish_reason,
                                     stop_reason=c.stop_reason)]))
        if body.include_usage:
            yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[],
                                         usage=usage_of([finals[k] for k in sorted(finals)])))
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield _error_event(e)
    finally:
        await gens.aclose()
    yield SSE_DONE


# -- chat ----------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM_DOC)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: Ctx) -> ChatCompletionResponse | Response:
    """Chat through the model's chat template; SSE when ``stream``."""
    ctx.card.check(body.model)
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format {body.response_format.type!r} is not supported "
                       "(no constrained decoding)", param="response_format")
    if body.tools and body.tool_choice != "none":
        raise APIError(400, "tools are not supported", param="tools")
    try:
        params = body.to_sampling_params()
    except ValueError as e:
        raise bad_input(e) from None
    ids = chat_prompt_ids(ctx.engine.tokenizer, openai_messages(body.messages), body.add_generation_prompt)
    rid = new_id("chatcmpl")
    gens = await _start(request, ctx, [ids], params, body.priority, rid, "messages")
    if body.stream:
        return sse_response(_chat_events(ctx, body, gens, rid))
    out = (await _finals(request, gens))[0]
    choices = [
        ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                   logprobs=chat_logprobs(c.logprobs or []) if body.logprobs else None,
                   finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        for c in out.outputs
    ]
    return ChatCompletionResponse(id=rid, model=ctx.card.id, choices=choices, usage=usage_of([out]))


async def _chat_events(ctx: ServerContext, body: ChatCompletionRequest, gens: Generations,
                       rid: str) -> AsyncIterator[str]:
    created, model = int(time.time()), ctx.card.id

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    tokens = SplicedEvents(lambda key: ChatCompletionChunk(id=rid, created=created, model=model, choices=[
        ChatChunkChoice(index=key[0], delta=DeltaMessage(content=SplicedEvents.SPLICE), finish_reason=key[1])]))
    track, final = _ChoiceTracker(), None
    try:
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(body.n)])
        async for _, out in gens.outputs():
            final = out
            for c in out.outputs:
                if not track.fresh(c.index, c):
                    continue
                if c.delta_text and not body.logprobs:  # a token's text: the common event, spliced
                    yield tokens.event((c.index, c.finish_reason), c.delta_text)
                    continue
                lp = chat_logprobs(c.delta_logprobs or []) if body.logprobs else None
                yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=c.delta_text or None),
                                             logprobs=lp, finish_reason=c.finish_reason)])
        if body.include_usage and final is not None:
            yield chunk([], usage_of([final]))
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield _error_event(e)
    finally:
        await gens.aclose()
    yield SSE_DONE
