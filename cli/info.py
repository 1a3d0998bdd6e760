"""``edgellm info``: the hardware and software edgellm sees, as text or JSON."""
from __future__ import annotations

import json
from typing import Any

import click

from edgellm.cli.models import human_size


def _yes(flag: bool | None) -> str:
    return "?" if flag is None else "yes" if flag else "no"


def _devices(entry: dict[str, Any]) -> str:
    if not entry["available"]:
        return "no"
    return "yes" + (f" ({', '.join(entry['devices'])})" if entry.get("devices") else "")


def render(info: dict[str, Any]) -> str:
    """The human-readable report of ``sysinfo.collect()``."""
    cpu, mem, libs = info["cpu"], info["memory"], info["libraries"]
    isa = ", ".join(name for name, present in cpu["isa"].items() if present) or "none of note"
    rows = [
        ("edgellm", f"{info['edgellm']} (Python {info['python']}, {info['platform']})"),
        ("CPU", f"{cpu['model']} [{cpu['arch']}]"),
        ("ISA", isa),
        ("cores", f"{cpu['physical_cores']} physical, {cpu['logical_cpus']} logical, {cpu['usable_cpus']} usable"),
        ("threads", f"{cpu['threads']} (CPU backend default)"),
        ("torch", f"{info['torch']} (CPU capability {info['torch_cpu_capability']})"),
        ("CUDA", _devices(info["cuda"]) + (f", CUDA {info['cuda']['version']}" if info["cuda"]["version"] else "")),
        ("ROCm", _devices(info["rocm"]) + (f", HIP {info['rocm']['version']}" if info["rocm"]["version"] else "")),
        ("XPU", _devices(info["xpu"])),
        ("devices", ", ".join(info["devices"])),
        *((name, version or "not installed") for name, version in libs.items()),
        ("memory", f"{human_size(mem['available'])} available of {human_size(mem['total'])}"),
        ("cache", info["cache_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info_command(as_json: bool) -> None:
    """Show detected backends: CPU model and ISA (AVX2/AVX-512/VNNI/BF16/AMX), threads, CUDA/ROCm/XPU,
    IPEX, Numba, Triton and torch versions, memory and the cache directory."""
    from edgellm.cli.sysinfo import collect

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else render(info))
