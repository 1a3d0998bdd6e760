"""Hardware detection: pick a backend for ``device="auto"|"cpu"|"cuda"|"rocm"|"xpu"|"torch"``.

Backends are named by qualified class path and imported only when chosen, so a CPU install never
imports GPU kernel code.
"""
from __future__ import annotations

import importlib
import logging

import torch

from edgellm.backends.base import Backend

logger = logging.getLogger(__name__)

BACKENDS = {
    "cpu": "edgellm.backends.cpu.CPUBackend",
    "torch": "edgellm.backends.torch_ref.TorchBackend",
}


def available_devices() -> dict[str, bool]:
    """Which device kinds this machine and torch build can run."""
    cuda = torch.cuda.is_available()
    hip = getattr(torch.version, "hip", None) is not None
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return {"cpu": True, "cuda": cuda and not hip, "rocm": cuda and hip, "xpu": bool(xpu)}


def detect() -> str:
    avail = available_devices()
    for kind in ("cuda", "rocm", "xpu"):
        if avail[kind] and kind in BACKENDS:
            return kind
    return "cpu"


def get_backend(device: str = "auto", threads: int | None = None, batch_invariant: bool | None = None,
                warmup: bool = True) -> Backend:
    """Instantiate the backend for ``device``; ``auto`` picks the best one present. ``warmup=False``
    loads each kernel at its first use instead of all of them now."""
    kind = detect() if device in (None, "auto") else device
    if kind not in ("cpu", "cuda", "rocm", "xpu", "torch"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda, rocm, xpu or torch")
    if kind in ("cuda", "rocm", "xpu") and not available_devices()[kind]:
        raise RuntimeError(f"device {kind!r} was asked for but this machine/torch build has none")
    if kind not in BACKENDS:
        raise RuntimeError(f"no edgellm backend for {kind!r} is installed in this build")
    module, cls = BACKENDS[kind].rsplit(".", 1)
    backend_cls = getattr(importlib.import_module(module), cls)
    torch_device = {"cpu": "cpu", "torch": "cpu", "cuda": "cuda", "rocm": "cuda", "xpu": "xpu"}[kind]
    backend = backend_cls(torch_device, threads=threads, batch_invariant=batch_invariant, warmup=warmup)
    logger.info("using backend %s on %s", backend.name, torch_device)
    return backend
