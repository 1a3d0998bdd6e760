"""A saved tokenizer folder served by the ``tokenizers`` library directly, transformers only on demand.

Importing transformers costs ~0.6 s of every start, and the engine needs only encode, decode, the
special tokens and the chat template. ``FastTokenizer`` gives those from ``tokenizer.json`` and
``edgellm.chat_template``, with transformers' results (tests compare the two on real text and chats),
and loads transformers' own tokenizer the first time anything else is asked of it
(``convert_ids_to_tokens``, ``all_special_ids``, a chat with tools, ...), so callers see one object with
the whole Hugging Face API.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm import chat_template

# tokenizer_config.json keys whose meaning FastTokenizer reproduces; a folder with any other key
# (a decode clean-up, an added BOS, a custom class) is served by transformers alone
_KNOWN_KEYS = frozenset((
    "backend", "tokenizer_class", "bos_token", "eos_token", "unk_token", "pad_token", "added_tokens_decoder",
    "chat_template", "model_max_length", "is_local", "local_files_only", "clean_up_tokenization_spaces",
    "add_prefix_space", "model_input_names", "padding_side", "truncation_side", "extra_special_tokens",
))
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def fast_tokenizer_supported(config: dict[str, Any]) -> bool:
    """Whether a folder with this tokenizer_config.json is served exactly by ``FastTokenizer``."""
    return (config.get("tokenizer_class") == "TokenizersBackend" and set(config) <= _KNOWN_KEYS
            and not config.get("clean_up_tokenization_spaces") and not config.get("extra_special_tokens"))


class FastTokenizer:
    """Encode, decode and chat templates of a saved ``TokenizersBackend`` folder, without transformers.

    >>> tok = FastTokenizer(folder)  # doctest: +SKIP
    >>> tok.encode("The capital of France is")  # doctest: +SKIP
    [504, 3575, 282, 4649, 314]
    """

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = config if config is not None else json.loads((folder / "tokenizer_config.json").read_text())
        self.name_or_path = str(folder)
        self._hf: Any = None
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_truncation()  # transformers turns both off for a plain encode
        self._tok.no_padding()
        template = config.get("chat_template")
        jinja = folder / "chat_template.jinja"
        self.chat_template: str | None = template if template else (jinja.read_text() if jinja.is_file() else None)
        self.special_tokens_map = {k: _content(config[k]) for k in _SPECIAL if config.get(k)}
        for k in _SPECIAL:
            text = self.special_tokens_map.get(k)
            setattr(self, k, text)
            setattr(self, f"{k}_id", None if text is None else self._tok.token_to_id(text))

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if kwargs:
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if kwargs:
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: Any, add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs: Any) -> Any:
        """transformers' ``apply_chat_template``: rendered here for plain conversations, by transformers
        for everything else (tools, content parts, batches, dict outputs, other templates)."""
        plain = (not kwargs and self.chat_template and isinstance(conversation, list)
                 and chat_template.is_plain(conversation))
        if plain:
            import jinja2

            try:
                text = chat_template.render(self.chat_template, conversation, add_generation_prompt,
                                            self.special_tokens_map)
            except jinja2.TemplateSyntaxError:  # a template written for transformers' extensions
                plain = False
        if not plain:
            return self.hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                               tokenize=tokenize, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    @property
    def backend_tokenizer(self) -> Any:
        return self._tok

    @property
    def hf(self) -> Any:
        """transformers' tokenizer for the same folder, loaded on first use."""
        if self._hf is None:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            self._hf = TokenizersBackend.from_pretrained(self.name_or_path)
        return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_hf", "_tok", "name_or_path"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __repr__(self) -> str:
        return f"FastTokenizer({self.name_or_path!r}, vocab={len(self)})"


def _content(token: Any) -> str:
    """A special token's text: tokenizer_config.json stores a string or an AddedToken's fields."""
    return token["content"] if isinstance(token, dict) else str(token)
