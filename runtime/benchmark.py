"""Offline measurements on the engine itself: llama-bench style latency, and batch throughput."""
from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgellm.engine import LLMEngine
from edgellm.sampling_params import SamplingParams


@dataclass
class LatencyResult:
    prompt_tokens: int
    output_tokens: int
    repetitions: int
    prefill_tok_s: float
    prefill_tok_s_sd: float
    decode_tok_s: float
    decode_tok_s_sd: float
    ttft_ms: float
    tpot_ms: float
    temperature: float = 0.0  # 0: greedy, as llama-bench; > 0: every token sampled from the full logits


def random_prompt(engine: LLMEngine, n: int, seed: int = 0) -> list[int]:
    """``n`` random ordinary-token ids (special ids excluded), like llama-bench."""
    special = set(getattr(engine.tokenizer, "all_special_ids", []) or [])
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        t = rng.randrange(engine.vocab_size)
        if t not in special:
            ids.append(t)
    return ids


def latency(engine: LLMEngine, prompt_tokens: int = 512, output_tokens: int = 128, repetitions: int = 3,
            warmup: int = 1, temperature: float = 0.0) -> LatencyResult:
    """Prefill tokens/s for one ``prompt_tokens`` prompt and decode tokens/s for one stream.

    The prefill is timed as the first engine step (the whole prompt plus its first token);
    decode as every later step. Run with prefix caching off so repetitions compute everything.
    """
    assert engine.scheduler.max_num_batched_tokens >= prompt_tokens, "raise max_num_batched_tokens"
    params = SamplingParams(temperature=temperature, max_tokens=output_tokens, ignore_eos=True)
    prefill, decode = [], []
    for rep in range(warmup + repetitions):
        engine.add_request(f"bench-{rep}", random_prompt(engine, prompt_tokens, rep), params)
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        t2 = time.perf_counter()
        if rep >= warmup:
            prefill.append(prompt_tokens / (t1 - t0))
            decode.append((output_tokens - 1) / (t2 - t1))
    sd = statistics.stdev if repetitions > 1 else (lambda xs: 0.0)
    p, d = statistics.mean(prefill), statistics.mean(decode)
    return LatencyResult(prompt_tokens, output_tokens, repetitions, p, sd(prefill), d, sd(decode),
                         1000 * prompt_tokens / p, 1000 / d, temperature)


@dataclass
class ThroughputResult:
    requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    requests_per_s: float
    output_tok_s: float
    total_tok_s: float
    temperature: float = 0.0


def load_prompts(path: str | Path, engine: LLMEngine, count: int, offset: int = 0) -> list[list[int]]:
    """Prompts from a loadgen JSONL file, through the chat template as the server would send them."""
    from edgellm.tokenizer import apply_chat_template

    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    recs = (recs[offset:] + recs[:offset])[:count]
    return [apply_chat_template(engine.tokenizer, r["messages"]) for r in recs]


def throughput(engine: LLMEngine, prompts: list[list[int]], output_tokens: int = 128,
               ignore_eos: bool = True, temperature: float = 0.0) -> ThroughputResult:
    """Submit every prompt at once and run the engine dry (offline batch inference)."""
    params = SamplingParams(temperature=temperature, max_tokens=output_tokens, ignore_eos=ignore_eos)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"tput-{i}", ids, params)
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                out_tokens += out.usage.completion_tokens
    dt = time.perf_counter() - t0
    n_prompt = sum(len(p) for p in prompts)
    return ThroughputResult(len(prompts), n_prompt, out_tokens, dt, len(prompts) / dt, out_tokens / dt,
                            (out_tokens + n_prompt) / dt, temperature)


def as_dict(result) -> dict:
    return asdict(result)
