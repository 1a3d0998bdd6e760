"""A client that leaves mid-stream aborts its request at once: KV usage returns to 0 in ``/metrics``."""
from __future__ import annotations

import time

import httpx
import pytest

from .conftest import HTTP_TIMEOUT, ServerProcess, metric, scrape

pytestmark = pytest.mark.slow


def kv_usage(h: httpx.Client) -> float:
    return metric(scrape(h), "edgellm_kv_cache_usage_perc")


def aborted(h: httpx.Client) -> float:
    return metric(scrape(h), "edgellm_requests_total", outcome="abort")


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}]}),
    ("/v1/completions", {"prompt": ["Once upon a time", "In a galaxy far away"]}),
])
def test_disconnect_mid_stream_frees_kv_blocks(server: ServerProcess, path: str, body: dict) -> None:
    body = {**body, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as h:
        before = aborted(h)
        with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as streaming, streaming.stream(
                "POST", path, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            events = 0
            while events < 3:  # a few chunks: the request is past its prefill and decoding
                events += next(lines).startswith("data:")
            assert kv_usage(h) > 0  # the request holds blocks while it streams
        # the connection is closed now: the server must notice, abort and free the blocks
        deadline = time.monotonic() + 10
        while kv_usage(h) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kv_usage(h) == 0
        assert aborted(h) == before + (2 if isinstance(body.get("prompt"), list) else 1)
        assert metric(scrape(h), "edgellm_num_requests_running") == 0
