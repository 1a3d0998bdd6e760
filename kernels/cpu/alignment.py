"""Numba's arrays on cache-line boundaries, so no AVX-512 load or AMX tile row straddles two lines.

Numba allocates every array made in compiled code (``np.empty``, ``np.zeros``, ...) on a 32-byte
boundary (``BaseContext.get_preferred_array_alignment``: "AVX prefers 32-byte alignment"), so about
half of them start in the middle of a 64-byte line, and with them every row whose length is a whole
number of lines. A 64-byte zmm load or tile row there reads two lines. On the AMX Xeon of round 38 the
32-row int4 matmuls of a decode step (30 layers' weights, widening buffer, output tiles and input rows
all shifted by 32 bytes) took 9.90-10.19 ms against 8.41-8.57 ms aligned, and one group's four tile
products with both A tiles shifted 250 against 130 cycles (BENCHMARKS.md, round 38).

``align_numba_arrays`` raises the preferred alignment of Numba's CPU target to a cache line. The
value is compiled into each kernel's allocations, so it must run before any kernel compiles or loads
from the cache (``kernels/cpu/__init__.py`` calls it; the cache directory is keyed on that file too).
"""
from __future__ import annotations

CACHE_LINE = 64


def align_numba_arrays(alignment: int = CACHE_LINE) -> bool:
    """Make Numba's CPU target allocate arrays on ``alignment``-byte boundaries (at least its own 32).
    Returns False where this Numba has no such setting (arrays then keep Numba's alignment)."""
    from numba.core.cpu import CPUContext

    base = getattr(CPUContext, "get_preferred_array_alignment", None)
    if not callable(base):
        return False
    if getattr(base, "edgellm_alignment", None) == alignment:
        return True

    def get_preferred_array_alignment(context, ty):
        return max(alignment, base(context, ty))

    get_preferred_array_alignment.edgellm_alignment = alignment
    CPUContext.get_preferred_array_alignment = get_preferred_array_alignment
    return True
