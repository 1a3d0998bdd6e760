"""Small pure helpers: sizes, tables, /proc/cpuinfo parsing, error lines."""
from __future__ import annotations

import click
import pytest

from edgellm.cli.errors import one_line
from edgellm.cli.models import format_table, human_size
from edgellm.cli.options import MemorySize
from edgellm.cli.sysinfo import parse_cpuinfo


@pytest.mark.parametrize(("text", "value"), [
    ("1073741824", 1 << 30), ("2GiB", 2 << 30), ("512M", 512 << 20), ("1.5 GB", 3 << 29), ("64k", 64 << 10),
    ("0.5", 0.5), ("1.0", 1.0),
])
def test_memory_size(text: str, value: float) -> None:
    assert MemorySize().convert(text, None, None) == value


@pytest.mark.parametrize("text", ["lots", "2 parsecs", "0", "1.5", "-1G", "0.0"])
def test_memory_size_rejects(text: str) -> None:
    with pytest.raises(click.BadParameter):
        MemorySize().convert(text, None, None)


def test_human_size_and_table() -> None:
    assert human_size(512) == "512 B"
    assert human_size(98_362_432) == "93.8 MiB"
    assert human_size(3 << 30) == "3.0 GiB"
    table = format_table(("NAME", "SIZE", "PATH"), [("a", "1 B", "/x"), ("longer-name", "2.0 KiB", "/y")])
    assert table.splitlines() == ["NAME         SIZE     PATH", "a            1 B      /x",
                                  "longer-name  2.0 KiB  /y"]


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""


def test_parse_cpuinfo_x86() -> None:
    info = parse_cpuinfo(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    isa = info["isa"]
    assert isa["avx2"] and isa["avx512"] and isa["avx512_vnni"] and isa["avx512_bf16"] and isa["amx"]
    assert not isa["avx_vnni"] and not isa["neon"]


def test_parse_cpuinfo_arm_and_old_x86() -> None:
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\nCPU part\t: 0xd0c\n")
    assert arm["isa"]["neon"] and not arm["isa"]["avx2"]
    old = parse_cpuinfo("model name\t: Core 2\nflags\t\t: fpu sse2 ssse3\n")
    assert not any(old["isa"].values())


def test_one_line() -> None:
    assert one_line(ValueError("a\n  b")) == "a b"
    assert one_line(FileNotFoundError(2, "No such file", "x.gguf")) == "[Errno 2] No such file: 'x.gguf'"
    assert one_line(RuntimeError("kaput")) == "RuntimeError: kaput (run with -v for the traceback)"
