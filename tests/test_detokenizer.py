"""Incremental detokenization: streamed deltas join to the full decode, stop strings cut it right."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgellm.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world, this is a plain sentence.",
    "Emoji: 👋🏽 and a family 👨‍👩‍👧 and flags 🇺🇸🇯🇵!",
    "中文文本：你好，世界。日本語のテキスト、한국어 텍스트",
    "Mixed: naïve café — 数学 ∑ x² 🤖 done.",
    "  leading spaces and\nnew lines\n\n\ttabs  ",
    "😀",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters and 𓀀 hieroglyphs",
]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def byte_fallback_tokenizer() -> Any:
    """A Llama-style tokenizer: '▁' for spaces, bytes for anything outside its tiny vocabulary, and a
    decoder that drops the text's leading space."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁Hello", "▁world", "▁the", "!", ".", "a", "b", "c", "d", "e", "é", "S", "T", "O", "P"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(params=["smollm2", "byte_fallback"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def stream(tokenizer: Any, ids: list[int], chunk: int = 1, flush: bool = True,
           **kwargs: Any) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feed ``ids`` ``chunk`` at a time; the deltas, the stop string matched and the detokenizer."""
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], **kwargs)
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        delta, stop = detok.add_tokens(ids[i : i + chunk])
        deltas.append(delta)
        if stop is not None:
            break
    if stop is None and flush:
        deltas.append(detok.flush())
    return deltas, stop, detok


def reference(tokenizer: Any, ids: list[int], stops: list[str], include: bool) -> tuple[str, str | None]:
    """What a non-streaming run returns: decode everything, cut at the earliest stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
    if not hits:
        return text, None
    at, _, stop = min(hits)
    return text[: at + len(stop)] if include else text[:at], stop


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_join_to_the_full_decode(tokenizer: Any, text: str, chunk: int):
    ids = encode(tokenizer, text)
    deltas, stop, detok = stream(tokenizer, ids, chunk)
    assert stop is None
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == detok.output_text
    # a character split across byte tokens is never shown half-made
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_really_split_across_ids(tokenizer: Any):
    ids = encode(tokenizer, "👋你")
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # so the tests above mean something
    deltas, _, _ = stream(tokenizer, ids, flush=False)
    assert [d for d in deltas if d] in (["👋", "你"], [" 👋", "你"], ["👋你"])


def test_leading_space_follows_the_tokenizer(byte_fallback_tokenizer: Any, smollm2_tokenizer: Any):
    bf_ids = encode(byte_fallback_tokenizer, "Hello world")
    assert "".join(stream(byte_fallback_tokenizer, bf_ids)[0]) == "Hello world"  # '▁Hello': space dropped
    sm_ids = encode(smollm2_tokenizer, " Hello world")
    assert "".join(stream(smollm2_tokenizer, sm_ids)[0]) == " Hello world"  # 'ĠHello': space kept


def test_special_tokens_skipped_or_shown(smollm2_tokenizer: Any):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tok, "Hi there") + [end] + encode(tok, " again")
    shown = "".join(stream(tok, ids, skip_special_tokens=False)[0])
    assert shown == tok.decode(ids, skip_special_tokens=False) and "<|im_end|>" in shown
    hidden = "".join(stream(tok, ids, skip_special_tokens=True)[0])
    assert hidden == tok.decode(ids, skip_special_tokens=True) == "Hi there again"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("text, stops", [
    ("The answer is 42. Done here.", ["42. D"]),  # spans token boundaries
    ("The answer is 42. Done here.", ["Done", "answer"]),  # the earliest wins
    ("STOP right there", ["STOP"]),  # at the very start
    ("Emoji 👋 stop 👋 here", ["👋 here"]),
    ("你好世界，再见", ["世界"]),
    ("no stop string in here", ["zzz", "herx"]),
    ("almost at the end x", ["x y", "end x"]),
])
def test_stop_strings_match_a_non_streaming_run(tokenizer: Any, text: str, stops: list[str],
                                                include: bool, chunk: int):
    ids = encode(tokenizer, text)
    deltas, stop, detok = stream(tokenizer, ids, chunk, stop=stops, include_stop_str_in_output=include)
    want_text, want_stop = reference(tokenizer, ids, stops, include)
    assert ("".join(deltas), stop) == (want_text, want_stop)
    assert detok.output_text == want_text
    if stop is not None:
        assert detok.flush() == ""


def test_stop_at_the_very_start_emits_nothing(smollm2_tokenizer: Any):
    ids = encode(smollm2_tokenizer, "STOP and more")
    deltas, stop, detok = stream(smollm2_tokenizer, ids, stop=["STOP"])
    assert stop == "STOP" and "".join(deltas) == "" and detok.output_text == ""
    assert detok.add_tokens(ids) == ("", None)  # finished: later tokens change nothing


def test_text_that_may_start_a_stop_string_is_held_then_released(smollm2_tokenizer: Any):
    tok = smollm2_tokenizer
    detok = IncrementalDetokenizer(tok, [], stop=["<END>"])
    assert detok.add_tokens(encode(tok, "value <")) == ("value ", None)
    assert detok.add_tokens(encode(tok, "EN")) == ("", None)  # "<EN" may still become "<END>"
    assert detok.output_text == "value "
    delta, stop = detok.add_tokens(encode(tok, "X"))  # "<ENX" can't: released
    assert (delta, stop) == ("<ENX", None) and detok.output_text == "value <ENX"
    assert detok.add_tokens(encode(tok, " <")) == (" ", None)
    assert detok.flush() == "<"  # finished for another reason: nothing is lost
    assert detok.output_text == "value <ENX <"


def test_only_a_possible_stop_prefix_is_held(smollm2_tokenizer: Any):
    tok = smollm2_tokenizer
    deltas, stop, _ = stream(tok, encode(tok, "aaaa aaab aaaa aab"), flush=False, stop=["aaab", "b!"])
    assert stop == "aaab" and "".join(deltas) == "aaaa "
    deltas, stop, detok = stream(tok, encode(tok, "axyxyzaxyz"), flush=False, stop=["xyz!"])
    assert stop is None and "".join(deltas) == "axyxyza"  # "xyz" may still become "xyz!"
    assert detok.flush() == "xyz"


def test_flush_shows_an_unfinished_character_like_decode(byte_fallback_tokenizer: Any):
    tok = byte_fallback_tokenizer
    ids = encode(tok, "ab 👋")[:-2]  # the emoji's last two bytes never come
    deltas, _, detok = stream(tok, ids, flush=False)
    assert "".join(deltas) == "ab "
    assert detok.flush() == "\ufffd" * 2 and detok.output_text == tok.decode(ids)  # a U+FFFD per byte


def test_stop_string_before_an_unfinished_character_is_found_at_once(byte_fallback_tokenizer: Any):
    tok = byte_fallback_tokenizer
    ids = encode(tok, "abc STOP👋")[:-3]  # ends inside the emoji
    deltas, stop, _ = stream(tok, ids, stop=["STOP"])
    assert stop == "STOP" and "".join(deltas) == "abc "


def test_each_step_decodes_a_short_window(smollm2_tokenizer: Any):
    class Counting:
        def __init__(self, inner: Any):
            self.inner, self.longest = inner, 0

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, **kwargs)

    counting = Counting(smollm2_tokenizer)
    ids = encode(smollm2_tokenizer, " ".join(TEXTS) * 8)
    assert len(ids) > 500
    deltas, _, _ = stream(counting, ids, stop=["never appears"])
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)
    assert counting.longest <= 8


def test_token_text_for_logprobs(smollm2_tokenizer: Any):
    tok = smollm2_tokenizer
    detok = IncrementalDetokenizer(tok, [])
    hello = encode(tok, " Hello")[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert detok.token_text(hello) == " Hello"
    assert detok.token_text(end) == "<|im_end|>"  # shown even when the text skips special tokens
