"""Weights on 2 MiB pages, where Linux grants them (transparent huge pages).

A batched decode step reads every weight once (~80 MB for SmolLM2-135M) after hundreds of MB of KV
cache have passed through the caches. On 4 KiB pages a weight page not touched lately then also costs
a page walk, whose entries have left the caches too; on 2 MiB pages the TLB covers 512x more. The
prepared weights are copied once, at load, into anonymous private mappings advised ``MADV_HUGEPAGE``
(honoured in THP's usual ``madvise`` mode) and bump-allocated from them; the copies are ordinary
numpy arrays. 32 streams offline: +4-6 % output tokens/s (BENCHMARKS.md, round 36).

The KV pool stays on 4 KiB pages: 2 MiB pages gained 4-5 % once resident in round 36 and nothing in
round 37, while their first touch cost ~10x more on the VM measured (~3 ms a MB: the host backs fresh
guest memory slowly; paging in a 1 GiB pool took 12 s against 0.5 s), which a run pays as its pool
grows, and the pool would grow in 2 MiB steps a layer.

Off with ``EDGELLM_HUGE_PAGES=0``, where the OS has no ``MADV_HUGEPAGE`` (not Linux) or THP is
``never``: then weights stay where they were made. The same bytes either way.
"""
from __future__ import annotations

import functools
import mmap
import os
import threading

import numpy as np
import torch

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # bytes a mapping: a model's weights in a few of them, at most one part-used
ALIGN = 64  # each array starts on a cache line
MIN_BYTES = 64 << 10  # smaller arrays stay where they are: a few of their pages cost nothing
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"

_lock = threading.Lock()
_chunk: np.ndarray | None = None  # the mapping being filled, 2 MiB-aligned, as bytes
_used = 0


@functools.cache
def _thp_available() -> bool:
    """Linux with ``MADV_HUGEPAGE`` and THP not ``never`` (read once: the mode is the machine's)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def enabled() -> bool:
    """Whether weights go onto 2 MiB pages here: THP available and ``EDGELLM_HUGE_PAGES`` not 0."""
    return os.environ.get("EDGELLM_HUGE_PAGES", "1") != "0" and _thp_available()


def _mapping(nbytes: int) -> np.ndarray:
    """``nbytes`` (a multiple of 2 MiB) of fresh private memory starting on a 2 MiB boundary, advised
    ``MADV_HUGEPAGE``; the array keeps the mapping alive."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(m, np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
    except OSError:  # refused: still ordinary memory, on 4 KiB pages
        pass
    return whole[skip:skip + nbytes]


def _take(nbytes: int) -> np.ndarray:
    global _chunk, _used
    with _lock:
        if nbytes > CHUNK // 2:  # a big array gets a mapping of its own
            return _mapping(-(-nbytes // HUGE_PAGE) * HUGE_PAGE)[:nbytes]
        start = -(-_used // ALIGN) * ALIGN
        if _chunk is None or start + nbytes > _chunk.shape[0]:
            _chunk, start = _mapping(CHUNK), 0
        _used = start + nbytes
        return _chunk[start:start + nbytes]


def on_huge_pages(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` on 2 MiB pages (``a`` itself where they are off, or ``a`` is small)."""
    if a.nbytes < MIN_BYTES or not enabled():
        return a
    out = _take(a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def tensor_on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``on_huge_pages`` for a contiguous CPU tensor (bf16 through its 16-bit pattern)."""
    if t.dtype == torch.bfloat16:
        return torch.from_numpy(on_huge_pages(t.view(torch.int16).numpy())).view(torch.bfloat16)
    return torch.from_numpy(on_huge_pages(t.numpy()))
