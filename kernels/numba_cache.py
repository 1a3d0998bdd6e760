"""Numba's on-disk kernel cache, one directory per state of the kernels' sources.

Numba checks a cached kernel against the size and time stamp of its own source file only. A kernel
compiled with other modules' kernels inside it (the one-region decode step holds attention, the
matmuls and the norms) keeps their old machine code after an edit to their files alone, as after a
``git pull`` in an editable install, and runs it without a word. ``key_cache_dir`` points Numba at a
directory named for every kernel source's size and time stamp, so any change starts a fresh cache.
"""
from __future__ import annotations

import hashlib
import os
import shutil

PREFIX = "edgellm-"
KEEP = 2  # earlier directories kept besides the current one (another checkout may still run them)


def source_stamp(package_dir: str) -> str:
    """A short hash of the names, sizes and modification times of the ``.py`` files in ``package_dir``."""
    h = hashlib.sha1()
    for entry in sorted(os.scandir(package_dir), key=lambda e: e.name):
        if entry.name.endswith(".py") and entry.is_file():
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _prune(base: str, current: str) -> None:
    """Remove all but the ``KEEP`` most recently modified earlier cache directories under ``base``."""
    try:
        old = [e for e in os.scandir(base) if e.name.startswith(PREFIX) and e.path != current and e.is_dir()]
    except OSError:
        return
    old.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for e in old[KEEP:]:
        shutil.rmtree(e.path, ignore_errors=True)


def key_cache_dir(package_dir: str) -> str | None:
    """Point Numba's cache (``numba.config.CACHE_DIR``) at ``<base>/edgellm-<source_stamp>``, where
    ``base`` is ``NUMBA_CACHE_DIR`` if set, else ``package_dir``'s ``__pycache__`` (where Numba keeps
    it by default). Must run before the kernels are decorated. Returns the directory, or None where
    ``base`` is not writable (Numba then falls back to its own choice, as before)."""
    import numba

    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(package_dir, "__pycache__")
    path = os.path.join(base, PREFIX + source_stamp(package_dir))
    fresh = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    numba.config.CACHE_DIR = path
    if fresh:
        _prune(base, path)
    return path
