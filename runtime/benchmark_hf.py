"""The Hugging Face transformers baseline, measured the way ``edgellm bench`` measures edgellm.

Same weights (transformers dequantizes the GGUF), same random prompts, greedy decoding with
transformers' own KV cache and ``generate``.
"""
from __future__ import annotations

import functools
import inspect
import statistics
import time
from pathlib import Path

import torch

from edgellm.benchmark import LatencyResult, ThroughputResult


def load_hf(model_path: str, dtype: str = "float32"):
    """transformers' model for a .gguf file or HF folder, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    p = Path(model_path)
    kwargs = {"dtype": getattr(torch, dtype)}
    if p.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(str(p), **kwargs).eval()


@functools.cache
def _cache_argument(model_class: type) -> str:
    """transformers 5.25 renamed ``forward``'s ``past_key_values`` to ``cache`` (the old name warns, and
    goes in 5.40); older releases know only ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def hf_step(model, input_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """One forward with transformers' KV cache: ``(logits, cache)``."""
    name = _cache_argument(type(model))
    out = model(input_ids=input_ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, getattr(out, name)


@torch.inference_mode()
def hf_latency(model, prompt: list[int], output_tokens: int, repetitions: int = 3,
               warmup: int = 1) -> LatencyResult:
    prefill, decode = [], []
    for rep in range(warmup + repetitions):
        t0 = time.perf_counter()
        logits, past = hf_step(model, torch.tensor([prompt]))
        nxt = logits[0, -1].argmax()
        t1 = time.perf_counter()
        for _ in range(output_tokens - 1):
            logits, past = hf_step(model, nxt.view(1, 1), past)
            nxt = logits[0, -1].argmax()
        t2 = time.perf_counter()
        if rep >= warmup:
            prefill.append(len(prompt) / (t1 - t0))
            decode.append((output_tokens - 1) / (t2 - t1))
    sd = statistics.stdev if repetitions > 1 else (lambda xs: 0.0)
    p, d = statistics.mean(prefill), statistics.mean(decode)
    return LatencyResult(len(prompt), output_tokens, repetitions, p, sd(prefill), d, sd(decode),
                         1000 * len(prompt) / p, 1000 / d)


@torch.inference_mode()
def hf_throughput(model, prompts: list[list[int]], output_tokens: int, batch_size: int = 32,
                  pad_id: int = 0) -> ThroughputResult:
    """``generate`` over left-padded batches of ``batch_size`` (static batching), greedy, no early stop."""
    t0 = time.perf_counter()
    out_tokens = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_tokens,
                             min_new_tokens=output_tokens, do_sample=False, pad_token_id=pad_id)
        out_tokens += (gen.shape[1] - width) * len(batch)
    dt = time.perf_counter() - t0
    n_prompt = sum(len(p) for p in prompts)
    return ThroughputResult(len(prompts), n_prompt, out_tokens, dt, len(prompts) / dt, out_tokens / dt,
                            (out_tokens + n_prompt) / dt)
