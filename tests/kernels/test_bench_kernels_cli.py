"""``python -m edgellm.kernels.cpu.bench_kernels``'s arguments: sections by name, a usage line otherwise."""
from edgellm.kernels.cpu import bench_kernels


def test_help_prints_the_sections(capsys):
    assert bench_kernels.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and all(name in out for name in bench_kernels.SECTIONS)


def test_an_unknown_section_is_named_with_the_usage(capsys):
    assert bench_kernels.main(["linear", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown section: nope" in err and "usage:" in err
