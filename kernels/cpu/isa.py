"""The instruction-set features Numba compiles the kernels for.

Numba targets the host CPU unless ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` name another (to build
a cache for other machines, or to try a laptop's AVX2-only code on a bigger CPU). The kernels choose
their instructions from the same features, so code that needs AVX-512 is never asked of a target
without it. ``NUMBA_CPU_FEATURES`` is LLVM's list (``+avx2,+fma,-avx512f,...``); with only
``NUMBA_CPU_NAME`` set, the features are not known here and only the portable kernels run.
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm
from numba.core import config


def parse_features(text: str) -> dict[str, bool]:
    """LLVM's ``+name,-name`` feature list as a dict."""
    out: dict[str, bool] = {}
    for item in text.split(","):
        item = item.strip()
        if item[:1] in "+-" and len(item) > 1:
            out[item[1:]] = item[0] == "+"
    return out


@functools.cache
def features() -> dict[str, bool]:
    """The features Numba compiles for: ``NUMBA_CPU_FEATURES`` if set, none when only ``NUMBA_CPU_NAME``
    names another CPU, else the host's."""
    if config.CPU_FEATURES is not None:
        return parse_features(config.CPU_FEATURES)
    if config.CPU_NAME is not None and config.CPU_NAME != llvm.get_host_cpu_name():
        return {}
    return {name: bool(on) for name, on in llvm.get_host_cpu_features().items()}


def has(*names: str) -> bool:
    """Whether the compile target has every one of ``names`` (LLVM's spelling: ``avx512vnni``)."""
    f = features()
    return all(f.get(n, False) for n in names)
