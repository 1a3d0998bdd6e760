"""Loading a model for a command: resolve (download if needed), then load behind a spinner on stderr."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Status:
    """What a running spinner says; the block may change ``message`` as it learns more."""

    def __init__(self, message: str) -> None:
        self.message = message


@contextlib.contextmanager
def spinner(message: str, stream: IO[str] | None = None, interval: float = 0.1) -> Iterator[Status]:
    """Show ``⠋ message (1.2 s)`` on ``stream`` (stderr) while the block runs, if it is a terminal."""
    out = stream or sys.stderr
    status = Status(message)
    if not out.isatty():
        yield status
        return
    done = threading.Event()
    start = time.perf_counter()

    def spin() -> None:
        i = 0
        while not done.wait(interval):
            out.write(f"\r{FRAMES[i % len(FRAMES)]} {status.message} ({time.perf_counter() - start:.1f} s)\x1b[K")
            out.flush()
            i += 1

    thread = threading.Thread(target=spin, name="edgellm-spinner", daemon=True)
    thread.start()
    try:
        yield status
    finally:
        done.set()
        thread.join()
        out.write("\r\x1b[K")
        out.flush()


# chat and generate run one request at a time: a KV cache for one full context is enough, and
# allocating the engine's server-sized default (up to 1 GiB) would only delay the first token
SINGLE_USER = {"max_num_seqs": 1}


FIRST_RUN = "compiling the CPU kernels for this machine, first run only (1-2 minutes on 2 cores)"


def load_llm(model: str, engine: dict[str, Any]) -> Any:
    """An ``LLM`` for ``model`` with engine options ``engine``, sized for one user: fetched first if
    not cached (with a progress bar), then loaded behind a spinner. Errors propagate (one line each).

    On a machine whose CPU kernels are not compiled yet, the load compiles all of them at once
    (``warmup=True``, with a helper process) and the spinner says so, rather than a first answer
    stalling for minutes without a word; ``llm.engine.config.warmup`` then tells the caller."""
    from edgellm.catalog import resolve_model

    read_ahead(resolve_model(model))  # a download shows its own progress bar, so before the spinner
    with spinner(f"loading {model}") as status:  # from here torch imports: ~1.5 s
        if first_run(engine):
            engine = {**engine, "warmup": True}
            status.message += f": {FIRST_RUN}"
        from edgellm import LLM

        return LLM(model, **{**SINGLE_USER, **engine})


def read_ahead(path: Path) -> None:
    """Ask the OS to read the model's weights into the page cache now, in the background, while Python
    spends ~1.5 s importing torch: after a reboot the file is no longer cached, and the load would
    otherwise wait for the disk on its own. Best effort: nothing happens where the OS cannot."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):  # AttributeError: no posix_fadvise (macOS, Windows)
            return


def first_run(engine: dict[str, Any]) -> bool:
    """Whether ``engine`` runs on the CPU backend and its kernels are not in Numba's cache yet."""
    from edgellm.backends.registry import detect

    device = engine.get("device") or "auto"
    if (detect() if device == "auto" else device) != "cpu":
        return False
    from edgellm.backends.cpu_warmup import kernels_compiled

    return not kernels_compiled()


def has_chat_template(llm: Any) -> bool:
    """Whether the model brings a chat template (instruct models do)."""
    return bool(getattr(llm.tokenizer, "chat_template", None))
