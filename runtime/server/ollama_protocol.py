"""Ollama's request and response shapes (docs/api.md of ollama/ollama) as pydantic models."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgellm.sampling_params import SamplingParams

# Ollama's runner defaults when neither the request nor a Modelfile sets them
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}


class OllamaOptions(BaseModel):
    """``options``: Modelfile parameters. Unknown ones (num_ctx, mirostat, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = Field(None, description="-1 or -2: up to the context length")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="-1: random")
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def to_sampling_params(self) -> SamplingParams:
        """SamplingParams with Ollama's defaults; ValueErrors name the (engine's) field."""
        given = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repeat_penalty, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        opts = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        max_tokens = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        seed = self.seed if self.seed is not None and self.seed >= 0 else None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, seed=seed, stop=stop, **opts)


class OllamaRequestBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = True
    format: str | dict[str, Any] | None = Field(None, description="not supported: only '' or null")
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = Field(None, description="accepted; the model stays loaded")
    think: bool | str | None = None


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaChatRequest(OllamaRequestBase):
    """``POST /api/chat``; no ``messages`` just loads the model, as in Ollama."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(OllamaRequestBase):
    """``POST /api/generate``; an empty ``prompt`` just loads the model, as in Ollama."""

    prompt: str = ""
    suffix: str | None = None
    system: str | None = Field(None, description="replaces the chat template's system message")
    template: str | None = Field(None, description="not supported (Go templates); use raw instead")
    context: list[int] | None = Field(None, description="the previous response's context, to continue it")
    raw: bool = False
    images: list[str] | None = None


class _Timed(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class OllamaChatResponse(_Timed):
    message: OllamaAssistantMessage


class OllamaGenerateResponse(_Timed):
    response: str
    context: list[int] | None = None


class OllamaModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]


class OllamaRunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: OllamaModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class OllamaPs(BaseModel):
    models: list[OllamaRunningModel]


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = Field(None, description="deprecated spelling of model")
    verbose: bool = False


class OllamaShow(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaVersion(BaseModel):
    version: str
