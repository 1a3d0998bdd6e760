"""``build_app``: the FastAPI application on an ``AsyncLLM`` (routes, errors, auth, CORS, queue limit)."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import edgellm
from edgellm.server import admin_routes, ollama_routes, openai_routes
from edgellm.server.context import ServerContext
from edgellm.server.errors import install_error_handlers
from edgellm.server.gate import OPEN_PATHS, Gate, GateMiddleware
from edgellm.server.metrics import ServerMetrics
from edgellm.server.model_card import ModelCard
from edgellm.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def build_app(engine: Any, settings: ServerSettings) -> FastAPI:
    """The HTTP app for ``engine`` (an ``AsyncLLM``); the caller runs it and shuts the engine down.

    >>> from edgellm import AsyncLLM                                    # doctest: +SKIP
    >>> app = build_app(AsyncLLM("smollm2-135m-instruct"), ServerSettings())  # doctest: +SKIP
    >>> uvicorn.run(app, port=8000)                                     # doctest: +SKIP
    """
    card = ModelCard.from_engine(engine, settings)
    gate = Gate(settings.max_queue)
    app = FastAPI(
        title="edgellm",
        version=edgellm.__version__,
        description=f"OpenAI- and Ollama-compatible API serving `{card.id}`.",
    )
    app.state.ctx = ServerContext(engine, settings, card, ServerMetrics(engine.stats, card.id), gate)
    install_error_handlers(app)
    for module in (openai_routes, ollama_routes, admin_routes):
        app.include_router(module.router)
    app.add_middleware(ollama_routes.JsonBodyMiddleware)
    app.add_middleware(GateMiddleware, gate=gate, api_key=settings.api_key)
    if settings.allowed_origins:  # outermost, so that 401/429/503 answers carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    if settings.api_key:
        _document_bearer_auth(app)
    return app


def _document_bearer_auth(app: FastAPI) -> None:
    """Make ``/openapi.json`` say what ``GateMiddleware`` enforces: a bearer key on all but a few paths."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "the server's --api-key"}
        schema["security"] = [{"bearer": []}]
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                if path in OPEN_PATHS:
                    op["security"] = []
                else:
                    op.setdefault("responses", {})["401"] = {"description": "missing or wrong API key"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
