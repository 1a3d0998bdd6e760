"""``bench/loadgen.py`` (the shared load generator) at concurrency 32: no failures, and ``/metrics`` counts it."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import SERVED_NAME, ServerProcess, finished_requests, metric, scrape

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CANDIDATES = [os.environ.get("EDGELLM_BENCH_DIR", ""), str(REPO.parent / "shared" / "bench"),
              str(REPO / "shared" / "bench"), "/work/shared/bench"]
REQUESTS = 128
MAX_TOKENS = 16


def bench_dir() -> Path:
    for c in CANDIDATES:
        if c and (Path(c) / "loadgen.py").is_file() and (Path(c) / "prompts.jsonl").is_file():
            return Path(c)
    message = f"loadgen.py and prompts.jsonl not found in any of {[c for c in CANDIDATES if c]}"
    if os.environ.get("CI"):  # CI always has shared/ beside the checkout: missing means broken
        pytest.fail(message)
    pytest.skip(message)


def capped_prompts(src: Path, dst: Path) -> Path:
    """The shared prompt set with each record's ``max_tokens`` (which beats ``--max-tokens``) capped."""
    with src.open() as f, dst.open("w") as g:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rec["max_tokens"] = min(int(rec.get("max_tokens", MAX_TOKENS)), MAX_TOKENS)
                g.write(json.dumps(rec) + "\n")
    return dst


def test_loadgen_concurrency_32_has_no_failures(server: ServerProcess, tmp_path: Path) -> None:
    bench = bench_dir()
    prompts = capped_prompts(bench / "prompts.jsonl", tmp_path / "prompts.jsonl")
    out = tmp_path / "loadgen.json"
    with httpx.Client(base_url=server.url, timeout=60) as h:
        before = finished_requests(h)
        prompt_before = metric(scrape(h), "edgellm_prompt_tokens_total")
    cmd = [sys.executable, str(bench / "loadgen.py"), "--url", server.url, "--model", SERVED_NAME,
           "--prompts", str(prompts), "--concurrency", "32", "--requests", str(REQUESTS),
           "--max-tokens", str(MAX_TOKENS), "--max-seconds", "3000", "--request-timeout", "3000", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    logger.info("loadgen: %s", json.dumps(result))
    assert result["failed"] == 0, result["errors"]
    assert result["completed"] == REQUESTS
    assert result["output_tokens"] > REQUESTS

    with httpx.Client(base_url=server.url, timeout=60) as h:
        assert finished_requests(h) - before == REQUESTS
        text = scrape(h)
        assert metric(text, "edgellm_prompt_tokens_total") - prompt_before > REQUESTS * 20
        assert metric(text, "edgellm_time_to_first_token_seconds_count") >= REQUESTS
        assert metric(text, "edgellm_e2e_request_latency_seconds_count") >= REQUESTS
        assert metric(text, "edgellm_kv_cache_usage_perc") == 0
        assert metric(text, "edgellm_num_requests_running") == metric(text, "edgellm_num_requests_waiting") == 0
        assert 0 <= metric(text, "edgellm_prefix_cache_hit_rate") <= 1
        assert metric(text, "edgellm_prefix_cache_queries_total") >= metric(text, "edgellm_prefix_cache_hits_total")
