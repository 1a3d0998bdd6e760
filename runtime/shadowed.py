"""The repository's top-level folders under their own names.

They are edgellm's subpackages (``kernels/`` is ``edgellm.kernels``), but a process started in a
checkout with its root on ``sys.path`` (``python -m``, ``python -c``, pytest's ``pythonpath``) can
also import them as ``kernels``, ``quant``, ... and so shadow installed distributions of those names:
transformers 5.25 requires Hugging Face's ``kernels`` and imports it with its models.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def replace_with_installed(name: str, folder: str) -> bool:
    """Called by the folder's ``__init__`` when it is being imported as the top-level ``name``: load the
    installed package of that name from the rest of ``sys.path`` in its place (the import returns
    what ``sys.modules`` holds once the ``__init__`` is done). False, and nothing changed, if there is none."""
    root = os.path.dirname(os.path.abspath(folder))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True
