"""The wheel ships every package and file of the source tree, and works when installed outside the repo.

The tree is copied to a temporary folder first so the build neither writes ``build/`` into the
working tree nor races another build there.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]  # "edgellm.quant" -> "quant"
SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
                              ".ruff_cache", ".venv", ".whl", "tests")


def shipped_sources(root: Path) -> dict[str, Path]:
    """Every file under a mapped source folder of ``root``, keyed by where it must land in the wheel."""
    expected = {}
    for package, folder in PACKAGE_DIR.items():
        src = root / folder
        prefix = package.replace(".", "/")
        for path in src.rglob("*"):
            rel = path.relative_to(src)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
                expected[f"{prefix}/{rel.as_posix()}"] = path
    return expected


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A snapshot of the tree: what the wheel is built from is what it is checked against."""
    src = tmp_path_factory.mktemp("build") / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    return src


@pytest.fixture(scope="module")
def wheel(source) -> Path:
    src = source
    out = src.parent / "dist"
    if importlib.util.find_spec("build") is not None:
        # setuptools >= 70.1 builds wheels without the `wheel` package that build-system.requires names
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "-o", str(out)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [built] = out.glob("edgellm-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_has_the_core_modules(names):
    for required in ["edgellm/__init__.py", "edgellm/catalog.py", "edgellm/backends/base.py",
                     "edgellm/quant/formats.py", "edgellm/cli/main.py"]:
        assert required in names
    assert any(n.startswith("edgellm/kernels/cpu/") for n in names)
    assert any(n.startswith("edgellm/kernels/triton/") for n in names)


def test_wheel_ships_every_source_file(source, names):
    missing = sorted(set(shipped_sources(source)) - names)
    packages = sorted({m.rsplit("/", 1)[0].replace("/", ".") for m in missing})
    assert not missing, (f"not in the wheel: {missing}. A new package folder must be added to "
                         f"[tool.setuptools] packages in pyproject.toml ({packages}); data files need "
                         "package-data.")


def test_wheel_declares_the_console_script(wheel, names):
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(entry_points).decode()
    assert "[console_scripts]" in text
    assert "edgellm = edgellm.cli.main:main" in text


def test_installed_wheel_imports_from_its_own_folder(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = (
        "import importlib.metadata as md, edgellm, edgellm.backends, edgellm.quant, edgellm.catalog\n"
        "dist = md.distribution('edgellm')\n"
        "[ep] = [e for e in dist.entry_points if e.name == 'edgellm']\n"
        "print(edgellm.__file__); print(edgellm.quant.__file__); print(dist.locate_file(''))\n"
        "print(callable(ep.load()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    init_file, quant_file, dist_root, loaded = done.stdout.split()
    for path in (init_file, quant_file, dist_root):
        assert Path(path).resolve().is_relative_to(target.resolve()), f"{path} is not the installed wheel"
    assert loaded == "True"


def test_top_level_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path):
    """In a checkout, ``python -c`` puts the root on sys.path, where ``kernels/`` (edgellm.kernels)
    would shadow Hugging Face's ``kernels`` that transformers imports with its models."""
    code = "import kernels, edgellm.kernels; print(kernels.__file__); print(edgellm.kernels.__file__)"
    ran = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    top, ours = (Path(line).resolve() for line in ran.stdout.split())
    assert ours == ROOT / "kernels" / "__init__.py"
    others = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    if importlib.machinery.PathFinder.find_spec("kernels", others) is None:
        assert top == ours  # nothing installed to shadow: the folder imports as itself
    else:
        assert ROOT not in top.parents
