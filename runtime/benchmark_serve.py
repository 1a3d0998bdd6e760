"""Serving measurements against any OpenAI-compatible server: TTFT, TPOT, ITL, throughput.

The same figures as the team's load generator, so ``edgellm bench serve`` numbers line up with it.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeRun:
    ok: bool = False
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client, url: str, body: dict, headers: dict) -> ServeRun:
    r = ServeRun()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if ev.get("usage"):
                    r.tokens = ev["usage"].get("completion_tokens") or 0
                for ch in ev.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") if "messages" in body else ch.get("text")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            r.ttft = now - t0
                        else:
                            r.itl.append(now - last)
                        last = now
                        chunks += 1
        r.e2e = time.perf_counter() - t0
        r.tokens = r.tokens or chunks
        r.ok = r.ttft is not None
        if not r.ok:
            r.error = "no tokens streamed"
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure, not a crash
        r.error = f"{type(exc).__name__}: {exc}"
    return r


async def _run(url: str, model: str, recs: list[dict], concurrency: int, max_tokens: int, temperature: float,
               ignore_eos: bool, api_key: str | None, chat: bool) -> tuple[list[ServeRun], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    queue: asyncio.Queue = asyncio.Queue()
    for rec in recs:
        queue.put_nowait(rec)
    results: list[ServeRun] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def worker() -> None:
            while not queue.empty():
                rec = queue.get_nowait()
                body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                        "stream_options": {"include_usage": True}}
                if ignore_eos:
                    body["ignore_eos"] = True
                body.update({"messages": rec["messages"]} if chat else {"prompt": rec["prompt"]})
                results.append(await _one(client, url.rstrip("/") + path, body, headers))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def serve_benchmark(url: str, prompts: str | Path, model: str = "default", concurrency: int = 8,
                    requests: int = 64, offset: int = 0, max_tokens: int = 128, temperature: float = 0.0,
                    ignore_eos: bool = False, api_key: str | None = None, chat: bool = True) -> dict:
    """Drive ``url`` with ``requests`` prompts at ``concurrency`` in flight; return the summary."""
    recs = [json.loads(line) for line in Path(prompts).read_text().splitlines() if line.strip()]
    recs = (recs[offset:] + recs[:offset])[:requests]
    results, wall = asyncio.run(_run(url, model, recs, concurrency, max_tokens, temperature, ignore_eos,
                                     api_key, chat))
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [x for r in ok for x in r.itl]
    toks = sum(r.tokens for r in ok)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 2)

    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({(r.error or "")[:120] for r in results if not r.ok})[:5],
        "concurrency": concurrency, "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3), "output_tokens": toks, "output_tok_per_s": round(toks / wall, 2),
        "ttft_ms": {"p50": ms(_pct(ttft, 50)), "p90": ms(_pct(ttft, 90)), "p99": ms(_pct(ttft, 99))},
        "tpot_ms": {"p50": ms(_pct(tpot, 50)), "p90": ms(_pct(tpot, 90)), "p99": ms(_pct(tpot, 99))},
        "itl_ms": {"p50": ms(_pct(itl, 50)), "p99": ms(_pct(itl, 99))},
        "e2e_ms": {"p50": ms(_pct([r.e2e for r in ok], 50)),
                   "mean": ms(statistics.mean([r.e2e for r in ok])) if ok else None},
    }
