"""Triton kernels for CUDA, ROCm and XPU."""
