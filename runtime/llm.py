"""``LLM``: the embedded, synchronous Python API."""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

from edgellm.config import EngineConfig
from edgellm.engine import LLMEngine
from edgellm.outputs import RequestOutput, StreamDelta
from edgellm.sampling_params import SamplingParams

Message = dict[str, Any]


def engine_config(model: str, **kwargs: Any) -> EngineConfig:
    """Build an ``EngineConfig``, rejecting unknown options by name."""
    known = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
    return EngineConfig(model=model, **kwargs)


class LLM:
    """Load a model once, then generate for many prompts at once (continuous batching).

    ``model`` is a catalog name (``edgellm list``), a ``.gguf`` file, or a Hugging Face folder.

    >>> from edgellm import LLM, SamplingParams                               # doctest: +SKIP
    >>> llm = LLM("smollm2-135m-instruct")                                    # doctest: +SKIP
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))[0]
    >>> print(out.text, out.finish_reason, out.usage)                         # doctest: +SKIP
    >>> for delta in llm.chat([{"role": "user", "content": "Hi!"}], stream=True):  # doctest: +SKIP
    ...     print(delta.text, end="", flush=True)
    """

    def __init__(self, model: str = "smollm2-135m-instruct", **engine_options: Any) -> None:
        self.engine = LLMEngine(engine_config(model, **engine_options))
        self._ids = itertools.count()
        self._parked: dict[str, list[RequestOutput]] = {}  # outputs for streams not being read now

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _add(self, prompt: str | list[int], params: SamplingParams | None, priority: int = 0) -> str:
        rid = f"llm-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params or SamplingParams())
        return rid

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion together; outputs come back in prompt order.

        A prompt is text or a list of token ids. Bad input raises ``ValueError`` before anything runs.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        reqs = [self.engine.make_request(f"llm-{next(self._ids)}", p, sp or SamplingParams())
                for p, sp in zip(prompts, plist)]
        for r in reqs:
            self.engine.add_request(r.request_id, r)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(reqs):
            for out in self.engine.step():
                if out.request_id in self._parked:  # a stream being read elsewhere
                    self._parked[out.request_id].append(out)
                elif out.finished:
                    done[out.request_id] = out
        return [done[r.request_id] for r in reqs]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield text deltas as they are generated; closing the iterator aborts the request."""
        rid = self._add(prompt, params)
        self._parked[rid] = []
        finished = False
        try:
            while not finished:
                for out in self._outputs_for(rid):
                    finished = out.finished
                    for c in out.outputs:
                        if c.delta_text or c.delta_token_ids or c.finish_reason:
                            yield StreamDelta(rid, c.index, c.delta_text, c.delta_token_ids, c.finish_reason,
                                              c.delta_logprobs, out.usage if out.finished else None)
        finally:
            self._parked.pop(rid, None)
            if not finished:
                self.engine.abort_request(rid)

    def _outputs_for(self, rid: str) -> list[RequestOutput]:
        """This stream's outputs: parked ones first, else one engine step (parking the others')."""
        mine = self._parked[rid]
        if not mine:
            for out in self.engine.step():
                if out.request_id in self._parked:
                    self._parked[out.request_id].append(out)
        self._parked[rid] = []
        return mine

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
             stream: bool = False, add_generation_prompt: bool = True):
        """Chat through the model's chat template.

        One conversation returns a ``RequestOutput`` (or, with ``stream=True``, an iterator of
        ``StreamDelta``); a list of conversations returns a list of outputs.
        """
        from edgellm.tokenizer import apply_chat_template

        if messages and isinstance(messages[0], dict):
            ids = apply_chat_template(self.tokenizer, messages, add_generation_prompt)  # type: ignore[arg-type]
            return self.stream(ids, params) if stream else self.generate([ids], params)[0]
        if stream:
            raise ValueError("stream=True takes one conversation")
        convs = [apply_chat_template(self.tokenizer, m, add_generation_prompt) for m in messages]  # type: ignore
        return self.generate(convs, params)
