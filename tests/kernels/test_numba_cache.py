"""Numba's kernel cache follows every kernel source, not just the cached function's own file."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba

from edgellm.kernels import numba_cache

INIT = """
import os
from edgellm.kernels.numba_cache import key_cache_dir
key_cache_dir(os.path.dirname(__file__))
"""
CALLER = """
from numba import njit
from .callee import value

@njit(cache=True)
def caller():
    return value() + 100
"""
CALLEE = """
from numba import njit

@njit(cache=True)
def value():
    return {}
"""


def _run(root, env) -> str:
    code = "from kpkg.caller import caller; print(caller())"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()


def test_an_edit_to_a_callees_file_reaches_its_cached_caller(tmp_path):
    """Numba alone would load ``caller``'s cached code, which holds the old ``value``: its own file did
    not change. Keyed by every source's stamp, the edit starts a fresh cache and the new value shows."""
    pkg = tmp_path / "kpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "caller.py").write_text(CALLER)
    callee = pkg / "callee.py"
    callee.write_text(textwrap.dedent(CALLEE.format(1)))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    assert _run(tmp_path, env) == "101"
    assert _run(tmp_path, env) == "101"  # now from the cache
    st = callee.stat()
    callee.write_text(textwrap.dedent(CALLEE.format(2)))  # same size
    os.utime(callee, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _run(tmp_path, env) == "102"
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith(numba_cache.PREFIX)]) == 2


def test_stamp_follows_each_source_and_old_directories_are_pruned(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.py", "b.py"):
        (src / name).write_text("x = 1\n")
    (src / "notes.txt").write_text("not a source")
    stamp = numba_cache.source_stamp(str(src))
    (src / "notes.txt").write_text("still not a source, longer")
    assert numba_cache.source_stamp(str(src)) == stamp
    os.utime(src / "b.py", ns=(0, 10**18))
    assert numba_cache.source_stamp(str(src)) != stamp

    base = tmp_path / "cache"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(base))
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    for i in range(4):  # four earlier states, the newest last
        old = base / f"{numba_cache.PREFIX}old{i}"
        old.mkdir(parents=True)
        os.utime(old, (1000 + i, 1000 + i))
    (base / "someone-elses").mkdir()
    path = numba_cache.key_cache_dir(str(src))
    assert path == str(base / (numba_cache.PREFIX + numba_cache.source_stamp(str(src))))
    assert numba.config.CACHE_DIR == path
    left = sorted(p.name for p in base.iterdir())
    assert left == sorted([os.path.basename(path), "someone-elses"]
                          + [f"{numba_cache.PREFIX}old{i}" for i in (2, 3)][:numba_cache.KEEP])
