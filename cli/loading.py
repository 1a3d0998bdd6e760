"""Loading a model for a command: resolve (download if needed), then load behind a spinner on stderr."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


@contextlib.contextmanager
def spinner(message: str, stream: IO[str] | None = None, interval: float = 0.1) -> Iterator[None]:
    """Show ``⠋ message (1.2 s)`` on ``stream`` (stderr) while the block runs, if it is a terminal."""
    out = stream or sys.stderr
    if not out.isatty():
        yield
        return
    done = threading.Event()
    start = time.perf_counter()

    def spin() -> None:
        i = 0
        while not done.wait(interval):
            out.write(f"\r{FRAMES[i % len(FRAMES)]} {message} ({time.perf_counter() - start:.1f} s)\x1b[K")
            out.flush()
            i += 1

    thread = threading.Thread(target=spin, name="edgellm-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out.write("\r\x1b[K")
        out.flush()


# chat and generate run one request at a time: a KV cache for one full context is enough, and
# allocating the engine's server-sized default (up to 1 GiB) would only delay the first token
SINGLE_USER = {"max_num_seqs": 1}


def load_llm(model: str, engine: dict[str, Any]) -> Any:
    """An ``LLM`` for ``model`` with engine options ``engine``, sized for one user: fetched first if
    not cached (with a progress bar), then loaded behind a spinner. Errors propagate (one line each)."""
    from edgellm.catalog import resolve_model

    resolve_model(model)  # a download shows its own progress bar, so do it before the spinner starts
    with spinner(f"loading {model}"):
        from edgellm import LLM

        return LLM(model, **{**SINGLE_USER, **engine})


def has_chat_template(llm: Any) -> bool:
    """Whether the model brings a chat template (instruct models do)."""
    return bool(getattr(llm.tokenizer, "chat_template", None))
