"""Shared fixtures: the real SmolLM2 model (GGUF and an HF folder made from it) and tiny random HF models.

The real model is never skipped: if it cannot be found or fetched the fixture fails and says why.
Derived folders are cached under ``<edgellm cache root>/test-cache/`` so they are built once per machine.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edgellm.fetch import cache_root

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the key value cache in fixed size blocks.",
    "Hello world! Edge devices run small language models on the CPU.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 GGUF from the model cache (``edgellm pull`` puts it there;
    tests never fetch)."""
    try:
        from edgellm.catalog import resolve_model

        return Path(resolve_model(SMOLLM2_NAME, download=False, progress=False))
    except Exception as e:  # noqa: BLE001 - any failure here means the real-model tests cannot run
        pytest.fail(
            f"the real model {SMOLLM2_NAME} is needed but not cached (run `edgellm pull {SMOLLM2_NAME}`): "
            f"{type(e).__name__}: {e}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf: Path) -> Path:
    """An HF safetensors folder (float32) made from the GGUF by transformers; built once per machine."""
    st = smollm2_gguf.stat()
    import transformers

    target = cache_root() / "test-cache" / (
        f"{smollm2_gguf.stem}-hf-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}"
    )
    if not (target / "model.safetensors").is_file():
        _build_hf_from_gguf(smollm2_gguf, target)
    return target


def _build_hf_from_gguf(gguf_path: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    logger.info("building the HF folder %s from %s (once per machine)", target, gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # a model loaded from GGUF refuses save_pretrained (its quantizer is not serializable): save by hand
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        written = json.loads((tmp / "config.json").read_text())
        assert written["architectures"] == ["LlamaForCausalLM"], written.get("architectures")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_tokenizer(bos: bool) -> Any:
    """A byte-level BPE of ~300 tokens trained on a few sentences, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=TINY_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=CHATML_TEMPLATE,
    )


_TINY_BASE: dict[str, Any] = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}


@pytest.fixture
def make_tiny_hf_model(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_tiny_hf_model(kind, **overrides) -> folder`` with a seeded random tiny model.

    ``kind`` is ``llama``, ``llama3`` (llama3 rope scaling), ``mistral`` or ``qwen2`` (q/k/v bias).
    Overrides go to the transformers config (``tie_word_embeddings=True``, ``num_key_value_heads=4``...),
    except ``max_shard_size`` (shards the safetensors), ``seed``, ``dtype`` and ``bos`` (tokenizer adds BOS).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    counter = iter(range(1000))

    def make(kind: str = "llama", **overrides: Any) -> Path:
        shard = overrides.pop("max_shard_size", None)
        seed = overrides.pop("seed", 0)
        dtype = overrides.pop("dtype", torch.float32)
        bos = overrides.pop("bos", kind.startswith("llama"))
        fields = {**_TINY_BASE, **overrides}
        if kind == "llama":
            config = LlamaConfig(**fields)
        elif kind == "llama3":
            config = LlamaConfig(rope_parameters=dict(LLAMA3_ROPE), **fields)
        elif kind == "mistral":
            config = MistralConfig(sliding_window=128, **fields)
        elif kind == "qwen2":
            config = Qwen2Config(**fields)
        else:
            raise ValueError(f"unknown tiny model kind {kind!r}")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():  # random norms and biases, so loading them wrong shows up
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", ".bias")):
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
        folder = tmp_path / f"{kind}-{next(counter)}"
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(str(folder), **kwargs)
        _tiny_tokenizer(bos).save_pretrained(str(folder))
        return folder

    return make
