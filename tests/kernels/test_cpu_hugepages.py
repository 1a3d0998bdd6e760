"""Weights and KV caches on 2 MiB pages (``backends/cpu_hugepages.py``): same bytes, advised mappings,
nothing resident before it is written, and all of it off with ``EDGELLM_HUGE_PAGES=0``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu_hugepages
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_hugepages import HUGE_PAGE, MIN_BYTES, empty_on_huge_pages, on_huge_pages
from edgellm.backends.cpu_weights import Int4PackedWeight
from tests.kernels.test_bf16_expand import quantized
from tests.kernels.test_cpu_memory import _resident_pages

needs_thp = pytest.mark.skipif(not cpu_hugepages.enabled(), reason="no transparent huge pages on this OS")


def vm_flags(address: int) -> set[str]:
    """The ``VmFlags`` of the mapping holding ``address`` (``hg``: advised ``MADV_HUGEPAGE``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_a_weight_is_copied_into_an_advised_mapping():
    a = np.random.default_rng(0).integers(0, 255, (300, 1000), dtype=np.uint8)
    b = on_huge_pages(a)
    assert b is not a and np.array_equal(a, b) and b.dtype == a.dtype and b.shape == a.shape
    assert b.flags.c_contiguous and b.ctypes.data % 64 == 0
    assert "hg" in vm_flags(b.ctypes.data) and "hg" not in vm_flags(a.ctypes.data)
    small = np.ones(MIN_BYTES // 8 - 1)
    assert on_huge_pages(small) is small  # a few pages of it cost nothing


@needs_thp
def test_big_and_many_arrays_each_keep_their_bytes():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1 << 16, 10 << 20, 3 << 16, 1 << 17)]
    copies = [on_huge_pages(a) for a in arrays]  # one past half a chunk: a mapping of its own
    assert all(np.array_equal(a, c) for a, c in zip(arrays, copies))
    spans = sorted((c.ctypes.data, c.ctypes.data + c.nbytes) for c in copies)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two overlap


@needs_thp
def test_a_kv_pool_is_advised_and_untouched_until_populated():
    be = CPUBackend(threads=2, warmup=False)
    caches = be.allocate_kv_cache(2, 4096, 16, 3, 64, torch.bfloat16)
    assert all(c.shape == (2, 4096, 3, 16, 64) and c.dtype == torch.bfloat16 for c in caches)
    assert all(c.data_ptr() % HUGE_PAGE == 0 and "hg" in vm_flags(c.data_ptr()) for c in caches)
    assert sum(_resident_pages(c) for c in caches) == 0
    be.populate_kv(caches, 0, 10)
    plane = caches[0][0]
    assert _resident_pages(plane[:10]) == -(-plane[:10].numel() * 2 // 4096)
    assert _resident_pages(plane) < plane.numel() * 2 // 4096 // 2  # in 2 MiB steps, not the whole pool
    int8 = be.allocate_kv_cache(1, 64, 16, 3, 64, torch.int8)[0]
    assert int8.shape == (2, 64, 3, 16, 68) and int8.dtype == torch.int8  # rows carry their scale


@needs_thp
def test_prepared_int4_weights_live_on_advised_pages():
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 1536, 576))  # scale-zeros past MIN_BYTES too
    assert "hg" in vm_flags(w.packed.data_ptr()) and "hg" in vm_flags(w.scale_zeros.data_ptr())
    assert w.packed.dtype == torch.uint8 and w.scale_zeros.dtype == torch.bfloat16


def test_edgellm_huge_pages_0_leaves_memory_to_the_allocator(monkeypatch):
    monkeypatch.setenv("EDGELLM_HUGE_PAGES", "0")
    assert not cpu_hugepages.enabled()
    a = np.ones((512, 1024), np.float32)
    assert on_huge_pages(a) is a
    t = empty_on_huge_pages((4, 1 << 20), torch.bfloat16)
    assert t.shape == (4, 1 << 20) and t.dtype == torch.bfloat16
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 576, 576))
    before = Int4PackedWeight.from_quantized(quantized("Q4_1", 576, 576))
    assert torch.equal(w.packed, before.packed) and torch.equal(w.scale_zeros.view(torch.int16),
                                                                  before.scale_zeros.view(torch.int16))
