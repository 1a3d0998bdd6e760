"""Errors in OpenAI's JSON with the right status, and CORS: httpx against a real ``edgellm serve``."""
from __future__ import annotations

import httpx
import pytest

from .conftest import ALLOWED_ORIGIN, MAX_MODEL_LEN, SERVED_NAME

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Hi"}]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    return err


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 5}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": CHAT, "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [10**9], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
])
def test_bad_field_is_a_400_naming_it(http: httpx.Client, path: str, body: dict, param: str) -> None:
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_invalid_json_is_a_400(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                   400)
    assert "JSON" in err["message"]


def test_too_long_prompt_names_both_numbers(http: httpx.Client) -> None:
    prompt = "hello " * (MAX_MODEL_LEN + 200)
    n = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    for path, body in [("/v1/completions", {"prompt": prompt, "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]})]:
        err = error_of(http.post(path, json=body), 400)
        assert err["code"] == "context_length_exceeded"
        assert str(MAX_MODEL_LEN) in err["message"]
        if path == "/v1/completions":
            assert str(n) in err["message"]
        assert err["param"] in ("prompt", "messages")


def test_unknown_model_is_a_404_and_both_names_work(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": CHAT}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    root = http.get("/v1/models").json()["data"][0]["root"]
    for name in (SERVED_NAME, root):
        r = http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_unknown_route_and_method(http: httpx.Client) -> None:
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.get("/v1/completions"), 405)


def test_bad_input_does_not_disturb_a_running_request(http: httpx.Client, server) -> None:
    body = {"prompt": "Count: one, two,", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=600) as other, other.stream("POST", "/v1/completions",
                                                                              json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data:")
        for bad in ({"prompt": "x", "temperature": -1}, {"prompt": [10**9]}, {"prompt": "hello " * 3000}):
            assert http.post("/v1/completions", json=bad).status_code == 400
        events = [line for line in lines if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]


def test_cors_headers_for_the_allowed_origin_only(http: httpx.Client) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = http.options("/v1/chat/completions", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()

    denied = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in denied.headers

    simple = http.get("/v1/models", headers={"Origin": ALLOWED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert not any(h.startswith("access-control-") for h in http.get("/v1/models").headers)
