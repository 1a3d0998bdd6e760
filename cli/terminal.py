"""Terminal details of the chat: keep keys typed during an answer from being echoed into it."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def no_echo() -> Iterator[None]:
    """While active, keys typed on a terminal stdin are not echoed (Ctrl-C still signals).

    What is typed stays buffered and reaches the next prompt. A no-op when stdin is not a terminal.
    """
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
