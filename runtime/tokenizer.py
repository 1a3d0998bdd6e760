"""Small tokenizer helpers the engine and server share: prompts in, text out.

They follow transformers exactly (tests compare against it): a plain prompt gets the special tokens the
tokenizer's post-processor adds (BOS for Llama-2/3 tokenizers, none for SmolLM2); a chat is rendered
by the model's template, whose text already carries any BOS, so it is encoded without adding more.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain-text prompt, with BOS added the way the model's tokenizer adds it.

    >>> encode_prompt(tok, "The capital of France is")  # doctest: +SKIP
    [504, 3575, 282, 4649, 314]
    """
    return list(tokenizer.encode(text, add_special_tokens=True))


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The chat rendered to text by the model's template; ValueError if the model has none."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"model {name} has no chat template; send a plain prompt instead")
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
    )


def apply_chat_template(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a chat (``[{"role": "user", "content": "hi"}]``) rendered by the model's template.

    Equal to ``tokenizer.apply_chat_template(messages, add_generation_prompt=...)["input_ids"]``.

    >>> apply_chat_template(tok, [{"role": "user", "content": "hi"}])  # doctest: +SKIP
    [1, 9690, 198, ...]
    """
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: Any, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of ``token_ids`` (special tokens dropped unless asked for).

    >>> decode(tok, [19556, 905])  # doctest: +SKIP
    'Hello world'
    """
    return tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
