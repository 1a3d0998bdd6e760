"""Turning an exception into the one line a person reads on stderr."""
from __future__ import annotations

VERBOSE_KEY = "edgellm.verbose"  # in click's ctx.meta: how many -v were given

# exception types whose message is already written for people; anything else gets its type name
_PLAIN = ("ModelNotFoundError", "ModelLoadError", "FetchError", "PromptTooLongError", "ValueError",
          "FileNotFoundError", "PermissionError", "IsADirectoryError", "ConnectError", "HTTPStatusError",
          "ChatServerError")


def one_line(exc: BaseException) -> str:
    """A single-line description of ``exc``: its message, prefixed by its type unless self-explaining.

    >>> one_line(ValueError("temperature must be >= 0\\n(got -1)"))
    'temperature must be >= 0 (got -1)'
    >>> one_line(KeyError("x"))
    "KeyError: 'x' (run with -v for the traceback)"
    """
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if is_expected(exc) else f"{type(exc).__name__}: {message} (run with -v for the traceback)"


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure people cause and can fix (bad name, bad file), not a bug."""
    return any(c.__name__ in _PLAIN for c in type(exc).__mro__)
