"""What edgellm can see of this machine: CPU and ISA, accelerators, libraries, memory, cache.

Plain data (dicts of str/int/bool/None) so ``edgellm info --json`` can print it as it is.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

# ISA features that decide which kernels run fast, by the /proc/cpuinfo flag that announces each
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx_vnni": ("avx_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_tile",),
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
    "neon": ("neon", "asimd"),
}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model name and the ISA features of ``ISA_FLAGS`` from the text of /proc/cpuinfo.

    >>> parse_cpuinfo("model name\\t: Xeon\\nflags\\t\\t: fpu avx2 avx512f amx_tile\\n")["isa"]["avx512"]
    True
    """
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"model": model, "isa": {name: any(f in flags for f in names) for name, names in ISA_FLAGS.items()}}


def cpu_info(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model, ISA features, cores, and the thread count the CPU backend would use."""
    import psutil

    try:
        parsed = parse_cpuinfo(cpuinfo_path.read_text())
    except OSError:
        parsed = {"model": None, "isa": {name: None for name in ISA_FLAGS}}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return {
        "model": parsed["model"] or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "isa": parsed["isa"],
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cpus": usable,
        "threads": int(os.environ.get("EDGELLM_THREADS") or 0) or max(1, min(usable, physical)),
    }


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it; None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator_info() -> dict[str, Any]:
    """torch's view: version, CPU capability, and CUDA / ROCm / XPU devices."""
    import torch

    from edgellm.backends.registry import available_devices

    avail = available_devices()
    cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if (
        avail["cuda"] or avail["rocm"]) else []
    xpu_devices = [torch.xpu.get_device_name(i) for i in range(torch.xpu.device_count())] if avail["xpu"] else []
    return {
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": {"available": avail["cuda"], "version": torch.version.cuda,
                 "devices": cuda_devices if avail["cuda"] else []},
        "rocm": {"available": avail["rocm"], "version": getattr(torch.version, "hip", None),
                 "devices": cuda_devices if avail["rocm"] else []},
        "xpu": {"available": avail["xpu"], "devices": xpu_devices},
        "devices": [kind for kind, ok in avail.items() if ok],
    }


def memory_info() -> dict[str, int]:
    """System memory in bytes."""
    import psutil

    vm = psutil.virtual_memory()
    return {"total": vm.total, "available": vm.available}


def collect() -> dict[str, Any]:
    """Everything ``edgellm info`` reports."""
    from edgellm import __version__
    from edgellm.catalog import cache_root

    return {
        "edgellm": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        **accelerator_info(),
        "libraries": {name: package_version(dist) for name, dist in [
            ("ipex", "intel-extension-for-pytorch"), ("numba", "numba"), ("triton", "triton"),
            ("transformers", "transformers")]},
        "memory": memory_info(),
        "cache_dir": str(cache_root()),
    }
