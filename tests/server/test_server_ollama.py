"""Ollama's routes with the request and response shapes of its docs/api.md, streamed (NDJSON) and not."""
from __future__ import annotations

import json

import httpx
import pytest

from .conftest import MAX_MODEL_LEN, SERVED_NAME

pytestmark = pytest.mark.slow

DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
CHAT = [{"role": "user", "content": "Name three colors."}]


def ndjson(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def check_final(obj: dict, num_predict: int, model: str = SERVED_NAME) -> None:
    assert obj["done"] is True and obj["done_reason"] in ("stop", "length")
    assert obj["model"] == model and obj["created_at"].endswith("Z")  # Ollama echoes the name asked for
    for key in DURATIONS:
        assert isinstance(obj[key], int) and obj[key] >= 0, key
    assert obj["total_duration"] >= obj["eval_duration"] > 0
    assert obj["prompt_eval_count"] > 5 and 1 <= obj["eval_count"] <= num_predict
    if obj["done_reason"] == "length":
        assert obj["eval_count"] == num_predict


def test_generate_streams_ndjson_by_default(http: httpx.Client) -> None:
    lines = ndjson(http.post("/api/generate", json={"model": SERVED_NAME, "prompt": "Why is the sky blue?",
                                                    "options": {"num_predict": 8, "temperature": 0}}))
    assert len(lines) >= 2 and all(not x["done"] for x in lines[:-1])
    for x in lines[:-1]:
        assert set(x) == {"model", "created_at", "response", "done"}
    final = lines[-1]
    check_final(final, 8)
    assert final["response"] == "" and all(isinstance(t, int) for t in final["context"])

    single = http.post("/api/generate", json={"model": SERVED_NAME, "prompt": "Why is the sky blue?",
                                              "stream": False, "options": {"num_predict": 8, "temperature": 0}})
    assert single.status_code == 200 and single.headers["content-type"] == "application/json"
    one = single.json()
    check_final(one, 8)
    assert one["response"] == "".join(x["response"] for x in lines)  # greedy: same text both ways
    assert one["context"] == final["context"]


def test_generate_context_raw_system_and_options(http: httpx.Client) -> None:
    base = {"model": SERVED_NAME, "stream": False}
    first = http.post("/api/generate", json={**base, "prompt": "Say hi.", "options": {"num_predict": 4}}).json()
    cont = http.post("/api/generate", json={**base, "prompt": "Again.", "context": first["context"],
                                            "options": {"num_predict": 4}}).json()
    assert cont["prompt_eval_count"] > len(first["context"])
    raw = http.post("/api/generate", json={**base, "prompt": "The capital of France is", "raw": True,
                                           "options": {"num_predict": 3, "temperature": 0}}).json()
    assert "Paris" in raw["response"] and raw["prompt_eval_count"] < 10
    plain, system = (http.post("/api/generate", json={**base, "prompt": "Hi", "options": {"num_predict": 1},
                                                      **extra}).json()
                     for extra in ({}, {"system": "Answer in French."}))
    assert system["prompt_eval_count"] != plain["prompt_eval_count"]  # the system prompt replaced the default
    seeded = [http.post("/api/generate", json={**base, "prompt": "Pick a number.", "options": {
        "seed": 7, "temperature": 1.0, "num_predict": 6, "top_k": 50, "top_p": 0.95, "min_p": 0.01,
        "repeat_penalty": 1.2, "presence_penalty": 0.1, "frequency_penalty": 0.1, "num_ctx": 2048}}).json()
        for _ in range(2)]
    assert seeded[0]["response"] == seeded[1]["response"]
    stop = http.post("/api/generate", json={**base, "prompt": "The capital of France is", "raw": True,
                                            "options": {"num_predict": 8, "temperature": 0, "stop": ["."]}}).json()
    assert stop["done_reason"] == "stop" and "." not in stop["response"]


def test_chat_streamed_and_not(http: httpx.Client) -> None:
    # Outside batch-invariant mode a prompt read from the prefix cache takes other kernels than a cold
    # one, which may flip a near-tie; a first request caches the prompt, so both compared ones hit it.
    http.post("/api/chat", json={"model": SERVED_NAME, "messages": CHAT, "stream": False,
                                 "options": {"num_predict": 1, "temperature": 0}}).raise_for_status()
    lines = ndjson(http.post("/api/chat", json={"model": SERVED_NAME, "messages": CHAT,
                                                "options": {"num_predict": 8, "temperature": 0},
                                                "keep_alive": "5m"}))
    for x in lines[:-1]:
        assert x["message"]["role"] == "assistant" and x["done"] is False
    check_final(lines[-1], 8)
    assert lines[-1]["message"] == {"role": "assistant", "content": ""}
    one = http.post("/api/chat", json={"model": f"{SERVED_NAME}:latest", "messages": CHAT, "stream": False,
                                       "options": {"num_predict": 8, "temperature": 0}})
    body = one.json()
    check_final(body, 8, model=f"{SERVED_NAME}:latest")
    assert body["message"]["content"] == "".join(x["message"]["content"] for x in lines)


def test_curl_style_body_without_content_type(http: httpx.Client) -> None:
    r = http.post("/api/generate", content=json.dumps({"model": SERVED_NAME, "prompt": "Hi", "stream": False,
                                                       "options": {"num_predict": 2}}),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["eval_count"] <= 2


def test_load_requests_and_errors(http: httpx.Client) -> None:
    load = http.post("/api/generate", json={"model": SERVED_NAME}).json()
    assert load["done"] is True and load["done_reason"] == "load" and load["response"] == ""
    unload = http.post("/api/chat", json={"model": SERVED_NAME, "messages": [], "keep_alive": 0}).json()
    assert unload["done_reason"] == "unload"
    missing = http.post("/api/chat", json={"model": "llama9:70b", "messages": CHAT})
    assert missing.status_code == 404 and "llama9:70b" in missing.json()["error"]
    for body in ({"model": SERVED_NAME, "prompt": "Hi", "format": "json"},
                 {"model": SERVED_NAME, "prompt": "Hi", "template": "{{ .Prompt }}"},
                 {"model": SERVED_NAME, "prompt": "Hi", "options": {"temperature": -1}},
                 {"model": SERVED_NAME, "prompt": "Hi", "images": ["aGk="]},
                 {"prompt": "Hi"}):
        r = http.post("/api/generate", json=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), (body, r.text)
    long = http.post("/api/generate", json={"model": SERVED_NAME, "prompt": "hi " * 2000, "raw": True})
    assert long.status_code == 400 and str(MAX_MODEL_LEN) in long.json()["error"]


def test_model_routes(http: httpx.Client) -> None:
    tags = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == [SERVED_NAME]
    m = tags[0]
    assert m["size"] > 10_000_000 and len(m["digest"]) == 64 and m["modified_at"]
    assert m["details"]["family"] == "llama" and m["details"]["format"] == "gguf"
    assert m["details"]["quantization_level"] == "Q4_1" and m["details"]["parameter_size"] == "135M"

    show = http.post("/api/show", json={"model": SERVED_NAME}).json()
    assert "im_start" in show["template"] and show["capabilities"] == ["completion"]
    assert show["model_info"]["general.architecture"] == "llama"
    assert show["model_info"]["llama.context_length"] == MAX_MODEL_LEN
    assert show["model_info"]["llama.block_count"] == 30
    assert http.post("/api/show", json={"name": SERVED_NAME}).status_code == 200
    assert http.post("/api/show", json={"model": "other"}).status_code == 404

    ps = http.get("/api/ps").json()["models"]
    assert ps[0]["name"] == SERVED_NAME and ps[0]["expires_at"] and ps[0]["size_vram"] == 0
    assert http.get("/api/version").json()["version"]
