"""Weights on 2 MiB pages (``backends/cpu_hugepages.py``): the same bytes in advised mappings, and
left where they were made with ``EDGELLM_HUGE_PAGES=0``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends import cpu_hugepages
from edgellm.backends.cpu_hugepages import MIN_BYTES, on_huge_pages
from edgellm.backends.cpu_weights import Int4PackedWeight
from tests.kernels.test_bf16_expand import quantized

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
    assert "hg" in vm_flags(b.ctypes.data)  # (numpy advises its own big allocations too: not asked of ``a``)
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
def test_prepared_int4_weights_live_on_advised_pages():
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 1536, 576))  # scale-zeros past MIN_BYTES too
    assert "hg" in vm_flags(w.packed.data_ptr()) and "hg" in vm_flags(w.scale_zeros.data_ptr())
    assert w.packed.dtype == torch.uint8 and w.scale_zeros.dtype == torch.bfloat16


def test_edgellm_huge_pages_0_leaves_memory_to_the_allocator(monkeypatch):
    monkeypatch.setenv("EDGELLM_HUGE_PAGES", "0")
    assert not cpu_hugepages.enabled()
    a = np.ones((512, 1024), np.float32)
    assert on_huge_pages(a) is a
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 576, 576))
    before = Int4PackedWeight.from_quantized(quantized("Q4_1", 576, 576))
    assert torch.equal(w.packed, before.packed) and torch.equal(w.scale_zeros.view(torch.int16),
                                                                  before.scale_zeros.view(torch.int16))
