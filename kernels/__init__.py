"""Compute kernels: pure functions on tensors, no engine types."""
