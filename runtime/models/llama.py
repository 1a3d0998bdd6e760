"""The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2 (GQA, tied or untied embeddings, qkv bias).

Written only against backend ops; the same code runs on every device.
"""
from __future__ import annotations

from typing import Any

import torch

from edgellm.backends.base import AttentionMetadata, Backend, DecoderLayer, DecoderShape
from edgellm.config import ModelConfig
from edgellm.models.rope import cos_sin_table
from edgellm.quant import cat_rows


class LlamaForCausalLM:
    def __init__(self, config: ModelConfig, backend: Backend, dtype: torch.dtype) -> None:
        self.config = config
        self.backend = backend
        self.dtype = dtype
        self.layers: list[DecoderLayer] = []
        c = config
        self.scale = c.head_dim ** -0.5
        self.shape = DecoderShape(c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, self.scale,
                                  c.sliding_window, c.hidden_act)
        self.cos_sin = cos_sin_table(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling,
                                     backend.device)

    def load_weights(self, weights: dict[str, Any]) -> None:
        """Take HF-named weights, fuse q/k/v and gate/up, and let the backend place/repack them."""
        c, b, dt = self.config, self.backend, self.dtype
        take = weights.pop

        def prep(w: Any, role: str = "linear") -> Any:
            return b.prepare_weight(w, dt, role)

        def norm(name: str) -> torch.Tensor:
            return take(name).to(b.device, torch.float32)

        embed = take("model.embed_tokens.weight")
        lm_head = weights.pop("lm_head.weight", None)
        if lm_head is None or c.tie_word_embeddings:
            self.embed = self.lm_head = prep(embed, "tied_embedding")
        else:
            self.embed, self.lm_head = prep(embed, "embedding"), prep(lm_head, "lm_head")
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            bias = None
            if c.attention_bias:
                bias = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"]).to(b.device, dt)
            qkv = prep(cat_rows([take(a + f"{x}_proj.weight") for x in "qkv"]))
            gate_up = prep(cat_rows([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
            self.layers.append(DecoderLayer(
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=qkv,
                qkv_bias=bias,
                o_proj=prep(take(a + "o_proj.weight")),
                post_norm=norm(p + "post_attention_layernorm.weight"),
                gate_up=gate_up,
                down=prep(take(p + "mlp.down_proj.weight")),
                qkv_in=b.linear_input_dtype(qkv, dt),
                gate_up_in=b.linear_input_dtype(gate_up, dt),
            ))
        self.norm = norm("model.norm.weight")
        leftover = [k for k in weights if "rotary_emb" not in k]
        if leftover:
            raise ValueError(f"unexpected weights for a {c.architecture} model: {leftover[:5]}")

    @property
    def kv_source_dtype(self) -> torch.dtype:
        """What the k/v projections produce, the ``auto`` KV cache dtype: bf16 where the backend runs
        packed weights on bf16 activations (a float32 cache would only hold widened bf16 values)."""
        return self.layers[0].qkv_in if self.layers else self.dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        c, b = self.config, self.backend
        h = b.embedding(input_ids, self.embed, self.dtype)
        h, residual = b.decoder_layers(h, self.layers, self.shape, kv_caches, positions, self.cos_sin, meta)
        h, _ = b.rms_norm(h, self.norm, c.rms_norm_eps, residual, self.dtype)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, argmax_cols: int | None = None) -> torch.Tensor:
        return self.backend.logits(hidden, self.lm_head, argmax_cols)

    @torch.inference_mode()
    def compute_greedy(self, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
        """Each row's greedy token over the first ``vocab`` logits (int64 ``[T]``)."""
        return self.backend.greedy_tokens(hidden, self.lm_head, vocab)
