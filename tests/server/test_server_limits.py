"""``--api-key`` (401) and ``--max-queue`` (429 with Retry-After) on their own ``edgellm serve``."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import HTTP_TIMEOUT, SERVED_NAME, ServerProcess

pytestmark = pytest.mark.slow

KEY = "sk-test-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(smollm2_gguf, tmp_path_factory.mktemp("serve-guarded"), "--api-key", KEY,
                        "--max-queue", "1")
    yield srv
    assert srv.stop() == 0, srv.log_tail()


def test_api_key_is_required_except_for_health(guarded: ServerProcess) -> None:
    with httpx.Client(base_url=guarded.url, timeout=HTTP_TIMEOUT) as h:
        assert h.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                       headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        assert h.get("/v1/models").status_code == 401
        assert h.get("/metrics").status_code == 401
        ollama = h.post("/api/generate", json={"model": SERVED_NAME, "prompt": "Hi"})
        assert ollama.status_code == 401 and isinstance(ollama.json()["error"], str)
        assert h.get("/v1/models", headers=AUTH).status_code == 200
        spec = h.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    with openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0, timeout=600) as client:
        r = client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0) as client, pytest.raises(
            openai.AuthenticationError):
        client.models.list()


def test_queue_limit_answers_429_with_retry_after(guarded: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=guarded.url, timeout=HTTP_TIMEOUT, headers=AUTH) as h:
        with h.stream("POST", "/v1/chat/completions", json=body) as held:
            lines = held.iter_lines()
            assert next(lines).startswith("data:")  # admitted and streaming: the one slot is taken
            for path, extra in [("/v1/chat/completions", {}), ("/api/chat", {"model": SERVED_NAME})]:
                r = h.post(path, json={**body, **extra, "stream": False})
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
            assert h.post("/v1/chat/completions", json={**body, "stream": False}).json()["error"]["code"] == (
                "rate_limit_exceeded")
            assert h.get("/v1/models").status_code == 200  # only generation requests count
            assert [line for line in lines if line][-1] == "data: [DONE]"
        r = h.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200, r.text
