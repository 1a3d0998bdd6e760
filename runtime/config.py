"""Plain configuration data: the model's shape and the engine's knobs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """The architecture facts the model code needs, independent of the file format they came from."""

    architecture: str  # family key in edgellm.models.MODEL_REGISTRY, e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Build from a transformers ``PretrainedConfig`` (LlamaConfig, MistralConfig, Qwen2Config...)."""
        arch = (getattr(hf, "architectures", None) or [hf.model_type])[0]
        num_heads = hf.num_attention_heads
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        model_type = hf.model_type
        attention_bias = bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2"
        sliding = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
        rope_scaling = getattr(hf, "rope_scaling", None)
        rope_theta = getattr(hf, "rope_theta", None)
        rope_params = getattr(hf, "rope_parameters", None)  # transformers >= 5 folds theta in here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None,
            "default",
        ):
            rope_scaling = None
        return cls(
            architecture=_family_of(arch, model_type),
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            hidden_act=getattr(hf, "hidden_act", "silu"),
            sliding_window=sliding,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm": "llama",
}


def _family_of(arch: str, model_type: str) -> str:
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"unsupported architecture {arch!r} (model_type {model_type!r}); "
            f"supported model types: {', '.join(sorted(_FAMILIES))}"
        )
    return family


@dataclass
class EngineConfig:
    """Knobs for one engine instance; every field has a default a laptop user can live with."""

    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto | cpu | cuda | rocm | xpu | torch (generic reference)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # auto: the dtype the k/v projections produce (bf16 for packed GGUF weights on the CPU, else the
    # model dtype); bfloat16 halves the cache's memory (the CPU kernels widen it exactly); int8 stores
    # each row's codes and scale (quant.kv_int8): 0.53x bf16's bytes, a rounding of K and V
    kv_cache_dtype: str = "auto"
    weights: str = "auto"  # auto (as stored) | dequantize (GGUF tensors to dense)
    block_size: int = 16
    kv_cache_memory: int | float | None = None  # bytes, or a fraction of free memory
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: the backend's choice (Backend.step_tokens)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    threads: int | None = None
    # same outputs alone or in any batch, at some speed (None: $EDGELLM_BATCH_INVARIANT, else off)
    batch_invariant: bool | None = None
    seed: int = 0
    # load (or compile) every kernel a step can use at start-up, so the first request runs at full
    # speed; False loads each at its first use: sooner to a one-shot command's first token
    warmup: bool = True
    # lazy: the KV pool's pages are faulted in as its blocks are first handed out, so a light user's
    # memory stays small; idle: a long-running engine (the server) also pages the rest of the pool in
    # while it has nothing to do, as vLLM and llama.cpp allocate theirs at start-up, so a burst of
    # requests does not pay for it (a fresh VM's first touch costs 0.7-2.7 s a GiB)
    kv_page_in: str = "lazy"
    # speculative decoding by prompt lookup (vLLM's "ngram" method): up to this many draft tokens a
    # step for greedy requests, copied from where the sequence's last prompt_lookup_min..max tokens
    # occurred earlier in it, and verified in the same step (the output is the model's own argmax).
    # None: the backend's choice (2 on CPUs whose decode steps run in one region, else 0); 0: off.
    num_speculative_tokens: int | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    # drafts only while at most this many sequences run (None: the backend's choice, 2 on the CPU)
    speculative_max_seqs: int | None = None
