"""FastTokenizer and edgellm.chat_template against transformers, on SmolLM2's real tokenizer folder."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from edgellm.chat_template import is_plain, render
from edgellm.loader.fast_tokenizer import FastTokenizer, fast_tokenizer_supported
from edgellm.loader.gguf_file import read_header
from edgellm.loader.gguf_tokenizer import load_gguf_tokenizer, tokenizer_cache_dir

TEXTS = ["Hello world", " The capital of France is", "", "  two  spaces\n\ttab", "héllo wörld 👋🚀 中文",
         "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>text after", "code: def f(x):\n    return x**2\n",
         "numbers 1234567890 3.14159", "a" * 300]

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\\n\\n' -%}"
         "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}"
         "{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
         "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
         "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}{{ message['content'] | trim }}"
         "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")
HELPERS = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
           "{% if m.role == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}"
           "{{ dict(a='é') | tojson }}{% endfor %}{{ ns.n }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}")
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " hi "},
     {"role": "assistant", "content": "hello", "tool_calls": None}, {"role": "user", "content": "bye"}],
    [{"role": "user", "content": "a"}, {"role": "skip", "content": "b"}, {"role": "stop", "content": "c"},
     {"role": "user", "content": "d"}],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],  # Gemma's template refuses it
]


@pytest.fixture(scope="module")
def folder(smollm2_gguf: Path) -> Path:
    load_gguf_tokenizer(str(smollm2_gguf), read_header(str(smollm2_gguf)).metadata)  # cached from now on
    return tokenizer_cache_dir(str(smollm2_gguf))


@pytest.fixture(scope="module")
def pair(folder: Path) -> tuple[FastTokenizer, object]:
    return FastTokenizer(folder), AutoTokenizer.from_pretrained(str(folder))


def test_encode_decode_and_special_tokens_match_transformers(pair) -> None:
    fast, ref = pair
    for text in TEXTS:
        for special in (True, False):
            assert fast.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(ref)) for _ in range(rng.randrange(1, 40))] + [rng.randrange(17)]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert fast.decode(2) == ref.decode(2)
    assert len(fast) == len(ref) == 49152
    assert fast.special_tokens_map == ref.special_tokens_map
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(fast, name) == getattr(ref, name)
        assert getattr(fast, f"{name}_id") == getattr(ref, f"{name}_id")
    assert fast.chat_template == ref.chat_template


@pytest.mark.parametrize("template", [None, LLAMA3, GEMMA, HELPERS], ids=["smollm2", "llama3", "gemma", "helpers"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_templates_render_as_transformers_renders_them(pair, template, add_generation_prompt) -> None:
    fast, ref = pair
    fast_template, ref_template = fast.chat_template, ref.chat_template
    try:
        if template is not None:
            fast.chat_template = ref.chat_template = template
        for chat in CHATS:
            try:
                expected = ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
            except jinja2.TemplateError as e:
                with pytest.raises(jinja2.TemplateError, match=str(e)[:30]):
                    fast.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
                continue
            assert fast.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                            tokenize=False) == expected
            assert fast.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == ref.encode(
                expected, add_special_tokens=False)
    finally:
        fast.chat_template, ref.chat_template = fast_template, ref_template


def test_richer_conversations_go_to_transformers(pair) -> None:
    fast, ref = pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    reasoning = [{"role": "assistant", "content": "x", "reasoning_content": "think"}]
    assert not is_plain(parts) and not is_plain(reasoning) and not is_plain([])
    for chat in (parts, reasoning):
        assert (fast.apply_chat_template(chat, tokenize=False, chat_template=HELPERS)
                == ref.apply_chat_template(chat, tokenize=False, chat_template=HELPERS))
    kwargs = {"add_generation_prompt": True, "return_dict": True}
    assert fast.apply_chat_template(CHATS[0], **kwargs)["input_ids"] == ref.apply_chat_template(
        CHATS[0], **kwargs)["input_ids"]
    assert fast.convert_ids_to_tokens([1, 2]) == ref.convert_ids_to_tokens([1, 2])  # the rest of the HF API


def test_templates_stay_in_the_sandbox() -> None:
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}], False, {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{% set ns = namespace(_x=1) %}{{ ns._x }}", [{"role": "user", "content": "x"}], False, {})
    with pytest.raises(jinja2.TemplateError, match="no"):
        render("{{ raise_exception('no') }}", [{"role": "user", "content": "x"}], False, {})


def test_unfamiliar_tokenizer_configs_are_left_to_transformers() -> None:
    base = {"tokenizer_class": "TokenizersBackend", "eos_token": "</s>"}
    assert fast_tokenizer_supported(base)
    assert not fast_tokenizer_supported({**base, "tokenizer_class": "LlamaTokenizer"})
    assert not fast_tokenizer_supported({**base, "clean_up_tokenization_spaces": True})
    assert not fast_tokenizer_supported({**base, "add_bos_token": True})


@pytest.mark.slow
def test_a_cached_model_generates_without_importing_transformers(smollm2_gguf: Path) -> None:
    code = ("import sys\nfrom edgellm import LLM, SamplingParams\n"
            f"llm = LLM({str(smollm2_gguf)!r}, max_num_seqs=1)\n"
            "out = llm.chat([{'role': 'user', 'content': 'Hi'}], SamplingParams(max_tokens=4, temperature=0))\n"
            "assert out.outputs[0].token_ids, out\n"
            "print('LOADED', sorted(m for m in ('transformers', 'huggingface_hub') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert "LOADED []" in done.stdout, done.stdout + done.stderr
