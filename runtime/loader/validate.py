"""Check a loaded weight dict against its config: every parameter present, every shape right."""
from __future__ import annotations

import logging

import torch

from edgellm.config import ModelConfig
from edgellm.loader.errors import ModelLoadError
from edgellm.quant import QuantizedTensor

logger = logging.getLogger(__name__)

Weight = torch.Tensor | QuantizedTensor


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a llama-family model of ``config`` needs, in Hugging Face naming, with its shape."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if config.attention_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            })
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, Weight], source: str) -> dict[str, Weight]:
    """Return ``weights`` minus names the model does not use; ModelLoadError naming ``source`` if any
    parameter is missing or has the wrong shape."""
    want = expected_shapes(config)
    missing = [n for n in want if n not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"{source}: missing weights {', '.join(missing[:3])}{more}")
    for name, shape in want.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise ModelLoadError(f"{source}: weight {name} has shape {got}, the config implies {shape}")
    extra = [n for n in weights if n not in want]
    if extra:
        logger.warning("%s: ignoring %d unused weights (%s...)", source, len(extra), extra[0])
    return {n: weights[n] for n in want}
