"""SIGTERM while a request streams: new requests get 503, the stream completes, the process exits 0."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from .conftest import HTTP_TIMEOUT, ServerProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_signal_drains_in_flight_stream_then_exits_0(smollm2_gguf: Path, tmp_path: Path, sig: int) -> None:
    srv = ServerProcess(smollm2_gguf, tmp_path, "--drain-timeout", "300")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.Client(base_url=srv.url, timeout=HTTP_TIMEOUT) as h, h.stream("POST", "/v1/completions",
                                                                                  json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data:")
            srv.signal(sig)
            deadline = time.monotonic() + 30
            while True:  # the signal lands asynchronously; then new requests are refused
                with httpx.Client(base_url=srv.url, timeout=30) as fresh:
                    r = fresh.get("/health")
                if r.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert r.status_code == 503
            with httpx.Client(base_url=srv.url, timeout=30) as fresh:
                refused = fresh.post("/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            events = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert srv.proc.poll() is None or srv.proc.returncode == 0
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        srv.proc.wait(120)
        assert srv.proc.returncode == 0, srv.log_tail()
    finally:
        srv.stop()
