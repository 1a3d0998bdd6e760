"""Tokenizer helpers against transformers, and the GGUF tokenizer cache."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from edgellm.loader import load_model
from edgellm.loader.fast_tokenizer import FastTokenizer
from edgellm.loader.gguf_file import read_header
from edgellm.loader.gguf_tokenizer import load_gguf_tokenizer, tokenizer_cache_dir
from edgellm.tokenizer import apply_chat_template, decode, encode_prompt

TEXTS = ["Hello world", "The capital of France is", "  leading spaces\nand a newline, émoji 🚀", ""]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ],
]


def _reference_chat_ids(tok, messages, add_generation_prompt=True) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize(("kind", "bos"), [("llama", True), ("qwen2", False)])
def test_encode_prompt_adds_bos_like_transformers(make_tiny_hf_model, kind, bos):
    tok = load_model(str(make_tiny_hf_model(kind))).tokenizer
    for text in TEXTS:
        ids = encode_prompt(tok, text)
        assert ids == tok(text)["input_ids"]
        assert (ids[:1] == [tok.bos_token_id]) == bos
        assert decode(tok, ids) == text


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers_tiny(make_tiny_hf_model, messages, add_generation_prompt):
    folder = make_tiny_hf_model("llama")
    tok = load_model(str(folder)).tokenizer
    reference = AutoTokenizer.from_pretrained(str(folder))
    ids = apply_chat_template(tok, messages, add_generation_prompt)
    assert ids == _reference_chat_ids(reference, messages, add_generation_prompt)
    assert decode(tok, ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n"
    )


def test_model_without_chat_template_is_a_clear_error(make_tiny_hf_model):
    tok = load_model(str(make_tiny_hf_model("llama"))).tokenizer
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template(tok, CHATS[0])


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_equals_hf_folder(smollm2_gguf, smollm2_hf_dir):
    gguf_tok = load_model(str(smollm2_gguf)).tokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    assert len(gguf_tok) == len(hf_tok) == 49152
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert encode_prompt(gguf_tok, text) == hf_tok(text)["input_ids"]
    assert encode_prompt(gguf_tok, "Hello world")[0] != gguf_tok.bos_token_id  # SmolLM2 adds no BOS
    for messages in CHATS:
        assert apply_chat_template(gguf_tok, messages) == _reference_chat_ids(hf_tok, messages)
    ids = apply_chat_template(gguf_tok, CHATS[0])
    assert decode(gguf_tok, ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are")
    assert gguf_tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_gguf_tokenizer_is_converted_once_then_cached(smollm2_gguf, monkeypatch):
    metadata = read_header(str(smollm2_gguf)).metadata
    load_gguf_tokenizer(str(smollm2_gguf), metadata)  # cold or cached: afterwards it is cached
    cached = tokenizer_cache_dir(str(smollm2_gguf))
    assert (cached / "tokenizer.json").is_file()
    assert Path(cached).parent.name == "tokenizers"

    calls = []
    original = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    tok = load_gguf_tokenizer(str(smollm2_gguf), metadata)
    assert all(f is None for f in calls), "the second load must come from the cache, not the GGUF file"
    assert tok.chat_template == metadata["tokenizer.chat_template"]


def test_cached_tokenizer_skips_transformers_and_behaves_the_same(smollm2_gguf):
    """The cache loads through ``FastTokenizer`` (no transformers import at start-up): same ids, special
    tokens and chat template as AutoTokenizer gives for the same folder; the rest of the HF API still
    answers, through transformers loaded on demand."""
    metadata = read_header(str(smollm2_gguf)).metadata
    tok = load_gguf_tokenizer(str(smollm2_gguf), metadata)
    ref = AutoTokenizer.from_pretrained(str(tokenizer_cache_dir(str(smollm2_gguf))))
    assert isinstance(tok, FastTokenizer)
    for text in ["Hello world", " The capital of France is", "<|im_start|>user\nhé 👋<|im_end|>", "  two  spaces\n"]:
        assert tok.encode(text) == ref(text).input_ids == tok(text).input_ids
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert tok.all_special_ids == ref.all_special_ids and tok.eos_token_id == ref.eos_token_id


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    from edgellm.fetch import cache_root

    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home"
    monkeypatch.delenv("EDGELLM_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edgellm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "edgellm"
