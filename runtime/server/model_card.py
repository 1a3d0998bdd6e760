"""Facts about the one served model: its names, file, size and shape, for ``/v1/models`` and ``/api/*``."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.server.errors import APIError
from edgellm.server.settings import ServerSettings

logger = logging.getLogger(__name__)

_QUANT = re.compile(r"(?:^|[._-])(Q\d(?:_[A-Z0-9]+)*|IQ\d\w*|F16|F32|BF16)(?:$|[._-])", re.IGNORECASE)
_SIZE = re.compile(r"(?:^|[._ -])(\d+(?:\.\d+)?[MB])(?:$|[._ -])", re.IGNORECASE)


def _looks_like_path(model: str) -> bool:
    return os.sep in model or model.endswith(".gguf") or Path(model).exists()


def _model_path(model: str) -> Path | None:
    """The file or folder the model was loaded from, when it can be found without downloading."""
    p = Path(model)
    if p.exists():
        return p
    try:
        from edgellm.catalog import resolve_model

        found = Path(resolve_model(model))
        return found if found.exists() else None
    except Exception as e:  # noqa: BLE001 - facts for display only
        logger.debug("cannot resolve %s to a path: %s", model, e)
        return None


@dataclass
class ModelCard:
    """The served model's identity; ``check`` turns an unknown name into a 404."""

    id: str
    root: str
    max_model_len: int
    aliases: set[str] = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))
    path: str | None = None
    size: int = 0
    family: str = ""
    quantization: str = ""
    parameter_size: str = ""
    digest: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    chat_template: str = ""

    @classmethod
    def from_engine(cls, engine: Any, settings: ServerSettings) -> ModelCard:
        served = settings.served_model_name or (
            engine.model_name if _looks_like_path(settings.model) else settings.model)
        path = _model_path(settings.model)
        size, stamp = 0, settings.model
        if path is not None:
            files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            stamp = f"{path.resolve()}:{size}:{max(f.stat().st_mtime_ns for f in files)}"
        mc = getattr(getattr(engine, "engine", None), "model_config", None)
        config = dict(vars(mc)) if mc is not None else {}
        names = f"{Path(settings.model).name} {engine.model_name}"
        quant, psize = _QUANT.search(names), _SIZE.search(names)
        return cls(
            id=served, root=engine.model_name, max_model_len=engine.max_model_len,
            aliases={served, engine.model_name}, path=str(path) if path else None, size=size,
            family=str(config.get("architecture", "")), quantization=quant.group(1).upper() if quant else "",
            parameter_size=psize.group(1).upper() if psize else "",
            digest=hashlib.sha256(stamp.encode()).hexdigest(), config=config,
            chat_template=str(getattr(engine.tokenizer, "chat_template", None) or ""),
        )

    def matches(self, name: str | None) -> bool:
        if name is None:
            return True
        return name in self.aliases or name.removesuffix(":latest") in self.aliases

    def check(self, name: str | None) -> None:
        """Raise a 404 unless ``name`` is this model (None means "the only one")."""
        if not self.matches(name):
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.id}`.",
                           param="model", code="model_not_found")
