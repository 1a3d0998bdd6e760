"""Ending one-shot commands without the interpreter's teardown.

With torch and Numba loaded, Python's normal exit frees every module's objects and runs the libraries'
static destructors: ~0.5-0.9 s after the last token is already on screen, on a 2-core machine. A command
that has finished its work (``generate``, ``chat``) asks for a quick exit; the console script then flushes
the standard streams, runs the ``atexit`` handlers and leaves with ``os._exit``. Commands run in-process
(click's test runner, the Python API) are not affected: only ``main`` acts on the request.
"""
from __future__ import annotations

import atexit
import os
import sys

_requested = False


def request() -> None:
    """Ask the console script to skip the interpreter's teardown once this command returns."""
    global _requested
    _requested = True


def requested() -> bool:
    return _requested


def exit_now(code: object) -> None:
    """``sys.exit(code)``'s status and message, without the teardown: flush, run atexit, ``os._exit``."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be shown anyway
            pass
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is not None:
        run_exitfuncs()
    os._exit(status)
