"""The one error every loader raises: it always names the file and what is wrong with it."""
from __future__ import annotations


class ModelLoadError(ValueError):
    """A model file or folder could not be loaded; the message names the file and the problem.

    >>> raise ModelLoadError("/m/x.gguf: not a GGUF file (magic b'PK\\\\x03\\\\x04')")  # doctest: +SKIP
    """
