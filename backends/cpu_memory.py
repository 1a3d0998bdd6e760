"""Making a CPU tensor's pages resident in bulk, keeping its contents.

An untouched page of a large allocation is faulted in at its first write. Inside a step's kernels
that costs far more than doing it ahead in one call: ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+)
maps every page of a range, leaves pages that are already there as they are, and changes no data.
"""
from __future__ import annotations

import ctypes
import functools
import mmap

import torch

MADV_POPULATE_WRITE = 23
_unsupported = False


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def populate(t: torch.Tensor) -> bool:
    """Fault in every page of the contiguous CPU tensor ``t``; False where the OS cannot (then pages
    keep faulting in at their first write, as before)."""
    global _unsupported
    fn = _madvise()
    if fn is None or _unsupported or t.numel() == 0:
        return False
    assert t.is_contiguous() and t.device.type == "cpu"
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE  # the page holding the first byte
    end = t.data_ptr() + t.numel() * t.element_size()
    if fn(start, end - start, MADV_POPULATE_WRITE) == 0:
        return True
    _unsupported = ctypes.get_errno() == 22  # EINVAL: a kernel without MADV_POPULATE_WRITE
    return False
