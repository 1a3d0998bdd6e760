"""A real ``edgellm serve`` subprocess on loopback with the real SmolLM2 model, started once per session.

``ServerProcess`` runs ``python -m edgellm.cli.serve`` (the command users run) on a free port, waits
for ``/health`` and stops it with SIGTERM. Requests stay small: the machine has 2 cores.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

logger = logging.getLogger(__name__)

SERVED_NAME = "smollm2-135m-instruct"
ALLOWED_ORIGIN = "http://allowed.example"
MAX_MODEL_LEN = 1024
START_TIMEOUT = float(os.environ.get("EDGELLM_TEST_SERVER_START_S", "600"))
HTTP_TIMEOUT = httpx.Timeout(600.0, connect=30.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``edgellm serve`` process; ``url`` once started, ``stop()`` returns its exit status."""

    def __init__(self, model: Path, log_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        args = [sys.executable, "-m", "edgellm.cli.serve", str(model), "--port", str(self.port),
                "--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN),
                "--kv-cache-memory", "512MiB", "--log-level", "warning", *extra]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgellm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"edgellm serve did not become healthy in {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server: no API key, no queue limit, CORS for ``ALLOWED_ORIGIN``."""
    srv = ServerProcess(smollm2_gguf, tmp_path_factory.mktemp("serve"), "--allowed-origins", ALLOWED_ORIGIN)
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log_tail()}"


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
        yield client


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (Prometheus text) whose labels include ``labels``."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    assert found, f"metric {name} {labels} not in /metrics"
    return total


def scrape(client: httpx.Client) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200
    return r.text


def finished_requests(client: httpx.Client) -> float:
    text = scrape(client)
    return sum(metric(text, "edgellm_requests_total", outcome=o) for o in ("stop", "length"))
