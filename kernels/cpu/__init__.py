"""CPU kernels (Numba and torch ops)."""
import os
import sys

import numba

from edgellm.kernels.cpu.alignment import align_numba_arrays
from edgellm.kernels.numba_cache import key_cache_dir

key_cache_dir(os.path.dirname(__file__))  # before any kernel here is decorated
align_numba_arrays()  # likewise: compiled into every kernel's allocations


def _import_numba_np_without_scipy() -> None:
    """Load Numba's NumPy implementations without importing SciPy.

    ``numba.np.arraymath`` probes ``scipy.linalg.cython_blas`` when it is first imported (at the first
    compile or cache load), which imports all of ``scipy.linalg``: 0.11-0.18 s of a ~3 s start-up on a
    2-core machine. No edgellm kernel calls BLAS from Numba; the probe's only use is to pick a BLAS
    inner product for ``np.correlate``/``np.convolve``, and ``np.dot``-style functions still import
    SciPy themselves when a program compiles one. Where ``scipy.linalg`` is already loaded this does nothing.
    """
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # its import raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg"]


_import_numba_np_without_scipy()
# Start Numba's thread pool before any kernel runs. A kernel loaded from Numba's on-disk cache that
# reaches a parallel one (paged_attention_step -> paged_attention) links against the pool's
# scheduler; called first in a fresh process, before the pool exists, it fails with "LLVM ERROR:
# Symbol not found: allocate_sched" or crashes. get_num_threads() starts the pool.
numba.get_num_threads()
