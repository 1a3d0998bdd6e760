"""Hugging Face folders: configs of every llama-family kind, single vs sharded files, damaged folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgellm.loader import LoadedModel, ModelLoadError, load_model
from edgellm.loader.hf import INDEX_FILE


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    return {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k}


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama3", {}),
        ("mistral", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("llama", {"num_key_value_heads": 1, "head_dim": 32}),
    ],
)
def test_tiny_models_load_like_transformers(make_tiny_hf_model, kind, overrides):
    folder = make_tiny_hf_model(kind, **overrides)
    m = load_model(str(folder))
    assert isinstance(m, LoadedModel)
    hf = AutoConfig.from_pretrained(str(folder))
    c = m.config
    assert c.architecture == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (300, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads) == (4, hf.num_key_value_heads)
    assert c.head_dim == overrides.get("head_dim", 16)
    assert c.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert c.attention_bias == (kind == "qwen2")
    assert c.rms_norm_eps == pytest.approx(1e-6)
    assert (c.bos_token_id, c.eos_token_ids) == (1, [2])
    if kind == "llama3":
        assert c.rope_theta == 500000.0
        assert c.rope_scaling is not None and c.rope_scaling["rope_type"] == "llama3"
        assert c.rope_scaling["factor"] == 8.0 and c.rope_scaling["original_max_position_embeddings"] == 64
    else:
        assert c.rope_scaling is None
    assert c.sliding_window == (128 if kind == "mistral" else None)

    ref = _hf_state(folder)
    if c.tie_word_embeddings:
        assert "lm_head.weight" not in m.weights
        ref.pop("lm_head.weight")
    assert set(m.weights) == set(ref)
    for name, w in ref.items():
        assert torch.equal(m.weights[name], w), name
    if kind == "qwen2":
        assert m.weights["model.layers.1.self_attn.k_proj.bias"].shape == (32,)
    assert m.file_bytes == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert m.name == folder.name and m.path == str(folder)
    assert m.tokenizer.chat_template


def test_sharded_and_single_folders_give_identical_tensors(make_tiny_hf_model):
    single = load_model(str(make_tiny_hf_model("qwen2", seed=3)))
    sharded_dir = make_tiny_hf_model("qwen2", seed=3, max_shard_size="100KB")
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = load_model(str(sharded_dir))
    assert set(single.weights) == set(sharded.weights)
    for name, w in single.weights.items():
        assert torch.equal(w, sharded.weights[name]), name
    assert single.config == sharded.config


def test_stored_dtype_is_kept_and_dequantize_makes_float32(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama", dtype=torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in load_model(str(folder)).weights.values())
    assert all(w.dtype == torch.float32 for w in load_model(str(folder), dequantize=True).weights.values())


def test_missing_config_names_it(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        load_model(str(folder))


def test_corrupt_config_names_it(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(str(folder))


def test_unsupported_model_type_names_config(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json.*unsupported architecture"):
        load_model(str(folder))


def test_truncated_safetensors_names_the_file(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(str(folder))


def test_garbage_safetensors_names_the_file(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama")
    (folder / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read"):
        load_model(str(folder))


def test_missing_shard_names_it(make_tiny_hf_model):
    folder = make_tiny_hf_model("llama", max_shard_size="100KB")
    shard = max(folder.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(str(folder))


def test_missing_tensor_is_reported(make_tiny_hf_model):
    from safetensors.torch import load_file, save_file

    folder = make_tiny_hf_model("llama")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weights model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(folder))


def test_nonexistent_path_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(str(tmp_path / "nope"))


def test_empty_folder_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_hf_folder_loads(smollm2_hf_dir):
    m = load_model(str(smollm2_hf_dir))
    c = m.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_size, c.vocab_size) == (30, 9, 3, 576, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in m.weights
    assert c.rope_theta == 100000.0
    assert m.weights["model.embed_tokens.weight"].dtype == torch.float32
