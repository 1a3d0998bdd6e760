"""``ServerContext``: what every route needs, kept on ``app.state`` and handed out as a dependency."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from edgellm.server.gate import Gate
from edgellm.server.metrics import ServerMetrics
from edgellm.server.model_card import ModelCard
from edgellm.server.settings import ServerSettings


@dataclass
class ServerContext:
    engine: Any  # AsyncLLM, or anything with its generate/stats/tokenizer/model_name/max_model_len
    settings: ServerSettings
    card: ModelCard
    metrics: ServerMetrics
    gate: Gate


def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: ``ctx: ServerContext = Depends(get_context)``."""
    return request.app.state.ctx


Ctx = Annotated[ServerContext, Depends(get_context)]  # route parameter type: ``ctx: Ctx``
