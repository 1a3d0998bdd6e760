import sys

import pytest
import torch

from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_memory import populate


def _resident_pages(t: torch.Tensor) -> int:
    """How many of ``t``'s pages are mapped, from /proc/self/pagemap (present bit)."""
    import mmap
    import struct

    first = t.data_ptr() // mmap.PAGESIZE
    last = (t.data_ptr() + t.numel() * t.element_size() - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", f.read((last - first + 1) * 8))
    return sum(e >> 63 for e in entries)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_maps_every_page_and_keeps_contents():
    import mmap

    size = 8 << 20
    region = mmap.mmap(-1, size)  # fresh anonymous pages: none mapped yet
    t = torch.frombuffer(region, dtype=torch.uint8)
    t[:4096] = 7
    t[-1] = 9
    assert _resident_pages(t) <= 4
    if not populate(t):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    assert _resident_pages(t) >= size // 4096
    assert (t[:4096] == 7).all() and t[-1] == 9


def test_populate_kv_keeps_every_block():
    be = CPUBackend(threads=2, warmup=False)
    caches = be.allocate_kv_cache(2, 64, 16, 3, 64, torch.bfloat16)
    for c in caches:
        c[:, :8] = torch.randn(c[:, :8].shape).bfloat16()
    before = [c[:, :8].clone() for c in caches]
    be.populate_kv(caches, 4, 40)  # overlaps written blocks: populating changes no data
    assert all(torch.equal(c[:, :8], b) for c, b in zip(caches, before))
