"""Errors as the clients expect them: OpenAI's error JSON on ``/v1``, Ollama's ``{"error": ...}`` on ``/api``.

Every failure a client can cause maps to a 4xx naming the problem; anything else is a 500 without a
traceback in the body (the traceback goes to the log).
"""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} | {"top_logprobs"}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A failure with an HTTP status, rendered in the caller's protocol by the handlers below.

    >>> APIError(400, "temperature must be <= 2", param="temperature").body("/v1/completions")["error"]["param"]
    'temperature'
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self, path: str) -> dict[str, Any]:
        if is_ollama_path(path):
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, path: str) -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def bad_input(exc: ValueError, prompt_param: str | None = None) -> APIError:
    """A ``ValueError`` from request validation (SamplingParams, the engine) as a 400 naming the field.

    ``SamplingParams.validate`` starts its messages with the field's name and the engine starts its
    prompt complaints with "prompt"; ``prompt_param`` is what the caller's protocol calls the prompt
    (``prompt``, ``messages``). A prompt longer than the context gets OpenAI's ``context_length_exceeded``.
    """
    from edgellm.engine import PromptTooLongError

    message = str(exc)
    first = message.split(" ", 1)[0]
    if first == "prompt":
        param = prompt_param
    else:
        param = first if first in _SAMPLING_FIELDS else None
    code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else None
    return APIError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if item in _TYPE_TAGS or "[" in str(item) or "-" in str(item):
            break  # a union member's tag, not a field
        parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn pydantic's 422 into a 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg')}")
    param = _param_of(tuple(err.get("loc", ())))
    if param is None and err.get("type") == "missing":
        return APIError(400, "a JSON request body is required")
    msg = str(err.get("msg", "invalid value"))
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so that no error leaves the server in FastAPI's default shapes."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response(
            request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})").response(request.url.path)
