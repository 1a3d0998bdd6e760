"""Where edgellm keeps files it derives once per machine (converted tokenizers, test fixtures)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The edgellm cache root: ``$EDGELLM_HOME``, else ``$XDG_CACHE_HOME/edgellm``, else ``~/.cache/edgellm``.

    >>> cache_root().name  # doctest: +SKIP
    'edgellm'
    """
    home = os.environ.get("EDGELLM_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "edgellm"
    return Path.home() / ".cache" / "edgellm"
