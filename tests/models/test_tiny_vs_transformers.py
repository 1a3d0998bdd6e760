"""Tiny random Llama / Mistral / Qwen2 folders: our logits against transformers' in fp32."""
from __future__ import annotations

import pytest
import torch

from edgellm import LLM
from tests.engine.util import full_logits

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": LLAMA3_ROPE}),
    ("mistral", {}),
    ("qwen2", {}),
]


@pytest.mark.parametrize("device", ["torch", "cpu"])
@pytest.mark.parametrize("kind,overrides", CASES, ids=[f"{k}-{'-'.join(o) or 'plain'}" for k, o in CASES])
def test_logits_match_transformers(make_tiny_hf_model, kind, overrides, device):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(kind, **overrides)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), device=device, dtype="float32", kv_cache_memory=8 << 20, block_size=4)
    cfg = llm.engine.model_config
    assert cfg.num_kv_heads < cfg.num_heads  # GQA is exercised
    if kind == "qwen2":
        assert cfg.attention_bias
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (37,), generator=gen).tolist()
    ours = full_logits(llm.engine, ids)
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
