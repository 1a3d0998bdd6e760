"""Arrays made in compiled kernels start on a cache line (``kernels/cpu/alignment.py``)."""
import numpy as np
from numba import njit

import edgellm.kernels.cpu  # noqa: F401  (sets the alignment before anything here compiles)
from edgellm.kernels.cpu.alignment import CACHE_LINE, align_numba_arrays


@njit
def _offsets(sizes):
    out = np.empty(sizes.shape[0], np.int64)
    keep_bytes, keep_rows = [], []
    for i in range(sizes.shape[0]):
        if i % 2:
            a = np.empty(sizes[i], np.uint8)
            out[i] = a.ctypes.data % CACHE_LINE
            keep_bytes.append(a)  # alive, so each allocation is a new block
        else:
            rows = np.zeros((sizes[i], 3), np.float32)[1:]
            out[i] = rows.ctypes.data % CACHE_LINE
            keep_rows.append(rows)
    return out


def test_arrays_allocated_in_kernels_start_on_a_cache_line():
    sizes = np.random.default_rng(0).integers(1, 100_000, 200)
    # the [1:] slice of a row of 3 float32 moves 12 bytes into the block: only the blocks themselves are aligned
    offsets = _offsets(sizes)
    assert (offsets[1::2] == 0).all()
    assert (offsets[0::2] == 12).all()


def test_asking_again_keeps_one_setting():
    assert align_numba_arrays()
    assert align_numba_arrays()
    from numba.core.cpu import CPUContext
    assert CPUContext.get_preferred_array_alignment(None, None) == CACHE_LINE
