"""Streaming text for one sequence: token ids in, safe-to-show text deltas out, stop strings applied.

Each step decodes only a short window of the latest tokens (the prefix/read offsets of vLLM and TGI):
the text of ``tokens[prefix:]`` minus the text of ``tokens[prefix:read]`` is what the new tokens added.
Decoding from a token boundary the earlier window ended cleanly on keeps the tokenizer's own spacing
rules (a SentencePiece leading space, a byte-level "Ġ"), so the deltas join to ``tokenizer.decode`` of
all the output ids. While the window's text ends in U+FFFD the last character is still being spelled
out byte by byte and nothing is emitted.
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Incremental detokenization of one sequence's output, with stop strings.

    ``add_tokens`` returns ``(delta, stop)``: the text now safe to show, and the stop string that ended
    the text (then the output is final and later tokens are ignored). Text that may be the start of a
    stop string is held back until it cannot be; ``flush`` releases it when the request ends otherwise.
    The deltas always join to ``output_text``.

    ``prompt_token_ids`` are kept for reference only: the output is decoded on its own, so it equals
    ``tokenizer.decode(output_ids)`` (a SentencePiece tokenizer drops the first output token's space).

    >>> class Chars:  # a tokenizer whose ids are code points
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> d = IncrementalDetokenizer(Chars(), [], stop=["END"])
    >>> d.add_tokens([ord(c) for c in "hi E"])
    ('hi ', None)
    >>> d.add_tokens([ord(c) for c in "ND!"])
    ('', 'END')
    >>> d.output_text
    'hi '
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_reason: str | None = None

        self._tokens: list[int] = []
        self._prefix_offset = 0  # the window decoded each step starts here...
        self._read_offset = 0  # ...and text up to here has been read out of it
        self._prefix_text: str | None = ""  # decode(tokens[prefix:read]); None when to be recomputed
        self._held = ""  # decoded text that may begin a stop string
        self._emitted: list[str] = []
        self._token_texts: dict[int, str] = {}

    @property
    def output_text(self) -> str:
        """All text emitted so far: the deltas returned, joined."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def finished(self) -> bool:
        """Whether a stop string has ended the text."""
        return self.stop_reason is not None

    def add_tokens(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Feed newly generated ids; return (delta_text_safe_to_emit, matched_stop_string_or_None)."""
        if self.finished or not token_ids:
            return "", None
        self._tokens.extend(token_ids)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._tokens))
        if len(window) <= len(self._prefix_text):
            return "", None  # only special tokens so far: nothing shown, keep the window as it is
        new_text = window[len(self._prefix_text) :]
        if new_text.endswith(_REPLACEMENT):
            # a character is still incomplete; a stop string may already be whole before it
            complete = new_text.rstrip(_REPLACEMENT)
            return self._emit(complete, final_only=True)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._prefix_text = None
        return self._emit(new_text)

    def flush(self) -> str:
        """The request finished for another reason: release what was held back (an incomplete character
        shows as U+FFFD, as ``tokenizer.decode`` would show it)."""
        if self.finished:
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._tokens))
        delta = self._held + window[len(self._prefix_text) :]
        self._held = ""
        self._prefix_offset = self._read_offset = len(self._tokens)
        self._prefix_text = ""
        if delta:
            self._emitted.append(delta)
        return delta

    def token_text(self, token_id: int) -> str:
        """One token's display text, as for logprobs (special tokens included)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self._tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    def _emit(self, new_text: str, final_only: bool = False) -> tuple[str, str | None]:
        """Search stop strings in held + new text; emit what is safe. With ``final_only`` the text is
        not yet committed (its tokens are still in the window), so only a stop match may emit."""
        text = self._held + new_text
        if self.stop:
            hit = self._find_stop(text)
            if hit is not None:
                at, stop = hit
                delta = text[: at + len(stop)] if self.include_stop_str_in_output else text[:at]
                self._held = ""
                self.stop_reason = stop
                if delta:
                    self._emitted.append(delta)
                return delta, stop
        if final_only:
            return "", None
        keep = self._stop_prefix_len(text)
        delta, self._held = text[: len(text) - keep], text[len(text) - keep :]
        if delta:
            self._emitted.append(delta)
        return delta, None

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in ``text`` (the first listed wins a tie)."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = text.find(stop)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that some stop string starts with."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
