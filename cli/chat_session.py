"""A chat's state, with no I/O: system prompt, turns, sampling settings and statistics.

The terminal (``chat.py``) drives it: ``begin_turn`` adds the user's message and returns what the
model is sent; then ``finish_turn`` keeps the answer, or ``interrupt_turn`` drops the partial one
(as ``ollama run`` does on Ctrl-C: the question stays in the history, the cut-off answer does not).

>>> s = ChatSession(system="Be brief.")
>>> s.begin_turn("Hi")[0]["role"]
'system'
>>> s.finish_turn("Hello!", TurnStats(completion_tokens=3, seconds=0.5))
>>> [m["role"] for m in s.history]
['user', 'assistant']
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.sampling_params import SamplingParams

Message = dict[str, Any]

# what /set may change, each with the parser of its value; "none" resets seed and max_tokens
SETTING_TYPES: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "max_tokens": int,
    "seed": int,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
}
NULLABLE = {"seed", "max_tokens"}
DEFAULT_SETTINGS: dict[str, Any] = {
    "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "max_tokens": 512, "seed": None,
    "repetition_penalty": 1.1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
FORMAT_VERSION = 1


class SettingError(ValueError):
    """A /set that names no setting or gives a value it cannot take."""


class ConversationFileError(ValueError):
    """A file given to /load that does not hold a conversation."""


@dataclass
class TurnStats:
    """How one answer went, as the client saw it."""

    prompt_tokens: int | None = None
    completion_tokens: int = 0
    ttft: float | None = None  # seconds from sending to the first text
    seconds: float = 0.0  # from sending to the last chunk
    decode_seconds: float | None = None  # from the first token to the last
    interrupted: bool = False

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first, over the time they took."""
        if self.decode_seconds and self.completion_tokens > 1:
            return (self.completion_tokens - 1) / self.decode_seconds
        return None

    def summary(self) -> str:
        """``42 tokens, 31.2 tokens/s, TTFT 0.18 s`` (and ``, interrupted``)."""
        parts = [f"{self.completion_tokens} token{'s' if self.completion_tokens != 1 else ''}"]
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tokens/s")
        if self.ttft is not None:
            parts.append(f"TTFT {self.ttft:.2f} s")
        if self.prompt_tokens is not None:
            parts.append(f"prompt {self.prompt_tokens} tokens")
        if self.interrupted:
            parts.append("interrupted")
        return ", ".join(parts)


@dataclass
class SessionTotals:
    answers: int = 0
    interrupted: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, stats: TurnStats) -> None:
        self.answers += 1
        self.interrupted += stats.interrupted
        self.completion_tokens += stats.completion_tokens
        self.seconds += stats.seconds


@dataclass
class ChatSession:
    """History, system prompt and settings of one conversation, plus statistics."""

    system: str | None = None
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    history: list[Message] = field(default_factory=list)
    last: TurnStats | None = None
    totals: SessionTotals = field(default_factory=SessionTotals)
    pending: bool = False  # a user message is waiting for its answer

    # -- turns -----------------------------------------------------------------------------------
    def messages(self) -> list[Message]:
        """What the model sees: the system prompt (if any) then the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.history]

    def begin_turn(self, text: str) -> list[Message]:
        """Add the user's message; return the whole conversation to send."""
        assert not self.pending, "begin_turn twice without finishing the first"
        if not text.strip():
            raise ValueError("empty message")
        self.history.append({"role": "user", "content": text})
        self.pending = True
        return self.messages()

    def finish_turn(self, answer: str, stats: TurnStats) -> None:
        """Keep the model's complete answer."""
        assert self.pending, "finish_turn without begin_turn"
        self.history.append({"role": "assistant", "content": answer})
        self._record(stats)

    def interrupt_turn(self, stats: TurnStats) -> None:
        """The answer was cut off: drop it, keep the question (what ``ollama run`` does)."""
        assert self.pending, "interrupt_turn without begin_turn"
        stats.interrupted = True
        self._record(stats)

    def fail_turn(self) -> None:
        """The request failed before any answer: forget the question too, so it can be asked again."""
        assert self.pending, "fail_turn without begin_turn"
        self.history.pop()
        self.pending = False

    def _record(self, stats: TurnStats) -> None:
        self.pending = False
        self.last = stats
        self.totals.add(stats)

    def clear(self) -> None:
        """Forget the conversation; the system prompt and settings stay."""
        self.history.clear()

    # -- settings --------------------------------------------------------------------------------
    def set(self, name: str, raw: str) -> Any:
        """Parse and validate one setting; return the stored value. Raises ``SettingError``."""
        key = name.strip().lower().replace("-", "_")
        kind = SETTING_TYPES.get(key)
        if kind is None:
            raise SettingError(f"unknown setting {name!r}; settings: {', '.join(SETTING_TYPES)}")
        if key in NULLABLE and raw.strip().lower() in ("none", "off", "null"):
            value = None
        else:
            try:
                value = kind(raw)
            except ValueError:
                raise SettingError(f"{key} takes {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
        self.settings = _validated({**self.settings, key: value})
        return value

    def describe_settings(self) -> str:
        """One ``name value`` line per setting."""
        width = max(len(k) for k in self.settings)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in self.settings.items())

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The conversation as JSON data: OpenAI-style ``messages`` (system first) and ``settings``."""
        return {"version": FORMAT_VERSION, "messages": self.messages(), "settings": dict(self.settings)}

    def save(self, path: str | Path) -> Path:
        target = Path(path).expanduser()
        target.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        return target

    def load_json(self, data: Any) -> None:
        """Replace the conversation with ``data``: ``{"messages": [...], "settings": {...}}`` or a list of messages."""
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ConversationFileError("expected a JSON list of messages or an object with \"messages\"")
        messages = data["messages"]
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ConversationFileError(f"message {i} is not {{\"role\": system|user|assistant, \"content\": text}}")
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        settings = dict(self.settings)
        for key, value in (data.get("settings") or {}).items():
            if key not in SETTING_TYPES:
                raise ConversationFileError(f"unknown setting {key!r} in the file")
            settings[key] = value
        settings = _validated(settings)
        self.system = system
        self.history = [dict(m) for m in messages[1 if system is not None else 0:]]
        self.settings = settings

    def load(self, path: str | Path) -> int:
        """Load a conversation saved by ``save``; returns how many messages it holds."""
        source = Path(path).expanduser()
        try:
            data = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise ConversationFileError(f"{source} is not JSON: {e}") from None
        self.load_json(data)
        return len(self.history)


def _validated(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` if ``SamplingParams`` accepts them, else ``SettingError`` naming the bad one."""
    try:
        SamplingParams(**settings)
    except (ValueError, TypeError) as e:
        raise SettingError(str(e)) from None
    return settings
