"""Prompts from requests: chat messages through the model's template, token ids checked for range."""
from __future__ import annotations

import logging
from typing import Any

from edgellm.server.errors import APIError
from edgellm.server.protocol import ChatMessage

logger = logging.getLogger(__name__)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    param: str = "messages") -> list[int]:
    """Token ids of ``messages`` rendered by the model's chat template; a template error is a 400."""
    from edgellm.tokenizer import apply_chat_template

    try:
        return list(apply_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt))
    except Exception as e:
        logger.info("chat template refused the messages: %s", e)
        raise APIError(400, f"{param}: the chat template cannot render these messages: {e}",
                       param=param) from e


def openai_messages(msgs: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages as the plain ``{role, content}`` dicts chat templates expect."""
    out = []
    for i, m in enumerate(msgs):
        if isinstance(m.content, list):
            bad = [p.type for p in m.content if p.type != "text"]
            if bad:
                raise APIError(400, f"content parts of type {bad[0]!r} are not supported (text only)",
                               param=f"messages[{i}].content")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out
