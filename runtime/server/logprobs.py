"""The engine's ``TokenLogprob``s in OpenAI's two logprob shapes (chat and legacy completions)."""
from __future__ import annotations

from edgellm.outputs import TokenLogprob
from edgellm.server.protocol import ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob

_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report impossible tokens this way too


def _lp(x: float) -> float:
    return max(float(x), _FLOOR)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(lps: list[TokenLogprob]) -> ChoiceLogprobs:
    """``choices[].logprobs`` of a chat completion: one entry per generated token.

    >>> chat_logprobs([TokenLogprob(1, "Hi", -0.5, [(1, "Hi", -0.5)])]).content[0].bytes
    [72, 105]
    """
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(
            token=lp.token, logprob=_lp(lp.logprob), bytes=_bytes(lp.token),
            top_logprobs=[TopLogprob(token=t, logprob=_lp(v), bytes=_bytes(t)) for _, t, v in lp.top],
        )
        for lp in lps
    ])


def completion_logprobs(lps: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """``choices[].logprobs`` of a legacy completion; ``text_offset`` is where the first token starts.

    ``top_logprobs`` holds the chosen token next to the best ``logprobs`` alternatives, as vLLM does.

    >>> completion_logprobs([TokenLogprob(1, "a", -1.0, []), TokenLogprob(2, "bc", -2.0, [])], 5).text_offset
    [5, 6]
    """
    out = CompletionLogprobs()
    offset = text_offset
    for lp in lps:
        out.tokens.append(lp.token)
        out.token_logprobs.append(_lp(lp.logprob))
        top = {t: _lp(v) for _, t, v in lp.top}
        top.setdefault(lp.token, _lp(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out
