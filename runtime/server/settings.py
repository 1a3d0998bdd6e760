"""``ServerSettings``: everything ``edgellm serve`` needs to know, as plain data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerSettings:
    """Options of the HTTP server; ``engine_options`` go to ``AsyncLLM`` unchanged.

    >>> ServerSettings(model="smollm2-135m-instruct", port=8080, max_queue=16).port
    8080
    """

    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_queue: int | None = None  # in-flight generation requests; None or 0: unlimited
    drain_timeout: float = 30.0  # seconds in-flight requests may take to finish after SIGTERM/SIGINT
    log_level: str = "info"
    engine_options: dict[str, Any] = field(default_factory=dict)
