"""Chat templates rendered with Jinja2, set up the way transformers' ``apply_chat_template`` sets it up.

A template is untrusted code from a model file, so it runs in Jinja2's immutable sandbox, with the same
options (``trim_blocks``, ``lstrip_blocks``, loop controls) and helpers (``raise_exception``,
``strftime_now``, a non-escaping ``tojson``, ``namespace`` without underscore names) as transformers
gives templates; llama-cpp-python renders GGUF templates the same way. It exists so that the start-up
path need not import transformers (~0.6 s); ``FastTokenizer`` uses it for plain ``{role, content}``
conversations and hands anything richer (tools, content parts, reasoning, ``{% generation %}``
templates) to transformers. Tests compare its output with transformers' on real templates.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The compiled template; jinja2.TemplateSyntaxError if it does not parse (or needs an extension
    transformers adds, such as ``{% generation %}``)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore-prefixed names, a way out of the sandbox."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=Namespace)
    return env.from_string(source)


def render(source: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
           special_tokens: Mapping[str, str]) -> str:
    """``messages`` rendered by template ``source``, the special tokens' strings (``bos_token``, ...)
    visible to it as transformers makes them visible. jinja2.TemplateError if the template refuses.

    >>> render("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    ...        [{"role": "user", "content": "hi"}], False, {})
    '<user>hi'
    """
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return compile_template(source).render(messages=chat, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **special_tokens)


def is_plain(messages: Sequence[Any]) -> bool:
    """Whether every message is a dict of strings (None values are dropped) with no reasoning field,
    the conversations ``render`` treats exactly as transformers does."""
    return bool(messages) and all(
        type(m) is dict and all(type(k) is str and (v is None or type(v) is str) for k, v in m.items())
        and not _REASONING.intersection(m) for m in messages)


_REASONING = frozenset(("reasoning_content", "thinking", "reasoning"))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without the type's other attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)
