"""CPU kernels (Numba and torch ops)."""
import numba

# Start Numba's thread pool before any kernel runs. A kernel loaded from Numba's on-disk cache that
# reaches a parallel one (paged_attention_step -> paged_attention) links against the pool's
# scheduler; called first in a fresh process, before the pool exists, it fails with "LLVM ERROR:
# Symbol not found: allocate_sched" or crashes. get_num_threads() starts the pool.
numba.get_num_threads()
