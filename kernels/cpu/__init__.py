"""CPU kernels (Numba and torch ops)."""
