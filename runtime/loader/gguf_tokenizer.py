"""The tokenizer of a GGUF file, converted by transformers once and cached as a tokenizer folder.

Converting SmolLM2's 49k-token BPE with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` takes
~4 s; loading the saved result takes ~0.2 s. The cache key is the file's name, size and mtime plus
the transformers version (its converter decides the result).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgellm.fetch import cache_root
from edgellm.loader.errors import ModelLoadError
from edgellm.loader.fast_tokenizer import FastTokenizer, fast_tokenizer_supported

logger = logging.getLogger(__name__)


def tokenizer_cache_dir(path: str) -> Path:
    """The cache folder for the tokenizer of GGUF file ``path`` (it may not exist yet)."""
    from importlib.metadata import version  # importing transformers for its version costs ~0.6 s

    st = os.stat(path)
    key = f"{Path(path).stem}-{st.st_size}-{st.st_mtime_ns}-tf{version('transformers')}"
    return cache_root() / "tokenizers" / key


def load_gguf_tokenizer(path: str, metadata: dict[str, Any]) -> Any:
    """Return the PreTrainedTokenizerBase for GGUF ``path`` with the file's chat template set.

    >>> tok = load_gguf_tokenizer(path, read_header(path).metadata)  # doctest: +SKIP
    """
    cached = tokenizer_cache_dir(path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return _load_cached(cached)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            logger.warning("tokenizer cache %s is unreadable (%s); converting again", cached, e)
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    p = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot build the tokenizer from GGUF metadata: {e}") from e
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        tokenizer.chat_template = template
    logger.info("converted the tokenizer of %s in %.2f s", path, time.perf_counter() - t0)
    _save(tokenizer, cached)
    return tokenizer


def _load_cached(folder: Path) -> Any:
    """A cached tokenizer folder through ``FastTokenizer`` when that reproduces it (transformers'
    generic fast tokenizer, what GGUF conversion gives Llama-family BPE), so starting needs no
    transformers import; else through its own class (``AutoTokenizer`` loads every model's
    configuration mapping, ~1 s), or ``AutoTokenizer`` for other classes."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if fast_tokenizer_supported(config):
        return FastTokenizer(folder, config)
    if config.get("tokenizer_class") == "TokenizersBackend":
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # another transformers layout: the generic route below
            pass
        else:
            return TokenizersBackend.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _save(tokenizer: Any, target: Path) -> None:
    """Save atomically: write a sibling temp folder, then rename it into place."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as e:  # a read-only cache only costs time
        logger.warning("could not cache the tokenizer in %s: %s", target, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
