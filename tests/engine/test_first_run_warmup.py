"""Starting on a machine: telling compiled kernels from cold ones, the helper that halves the compile, and
reading the weights ahead while torch imports."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import edgellm
from edgellm.backends import cpu_warmup
from edgellm.backends.cpu import CPUBackend
from edgellm.cli import loading
from edgellm.kernels.cpu import decode_layers

WARM = CPUBackend(threads=2)  # compiles (first run) or loads every kernel, as any warmed backend does


def test_kernels_compiled_reads_numbas_cache(tmp_path):
    assert cpu_warmup.kernels_compiled()
    code = "from edgellm.backends.cpu_warmup import kernels_compiled; print(kernels_compiled())"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "empty")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_helper_process_runs_the_steps_and_exits():
    env = {**os.environ, cpu_warmup.HELPER_ENV: "1"}
    done = subprocess.run([sys.executable, "-m", "edgellm.backends.cpu_warmup"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


class FakeProcess:
    def __init__(self, args, env, **kwargs):
        self.args, self.env, self.killed = args, env, False
        STARTED.append(self)

    def kill(self):
        self.killed = True

    def wait(self):
        return 0


STARTED: list[FakeProcess] = []


def test_a_cold_warm_up_starts_a_helper_and_kills_it_when_done(monkeypatch):
    STARTED.clear()
    monkeypatch.setattr(cpu_warmup.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(cpu_warmup, "kernels_compiled", lambda: False)
    monkeypatch.setattr(cpu_warmup, "usable_cpus", lambda: 2)
    monkeypatch.delenv(cpu_warmup.HELPER_ENV, raising=False)
    cpu_warmup.warm_up(WARM)
    [proc] = STARTED
    assert proc.args[1:] == ["-m", "edgellm.backends.cpu_warmup"] and proc.env[cpu_warmup.HELPER_ENV] == "1"
    assert proc.killed


def test_no_helper_when_compiled_on_one_core_or_inside_the_helper(monkeypatch):
    STARTED.clear()
    monkeypatch.setattr(cpu_warmup.subprocess, "Popen", FakeProcess)
    cpu_warmup.warm_up(WARM)  # compiled: nothing to share
    monkeypatch.setattr(cpu_warmup, "kernels_compiled", lambda: False)
    monkeypatch.setattr(cpu_warmup, "usable_cpus", lambda: 1)
    cpu_warmup.warm_up(WARM)  # one core: two compiling processes would only take turns
    monkeypatch.setattr(cpu_warmup, "usable_cpus", lambda: 2)
    monkeypatch.setenv(cpu_warmup.HELPER_ENV, "1")
    cpu_warmup.warm_up(WARM)  # the helper itself never starts another
    assert STARTED == []


def test_steps_cover_the_default_warm_up_in_either_order():
    steps = cpu_warmup.steps(WARM)
    assert len(steps) == 8
    for step in reversed(steps):
        step()
    if WARM._gemv_rows:  # the one-call decode path: a model's stack of layers appends to its typed list
        assert decode_layers._list_of.signatures and decode_layers._append.signatures


def test_first_run_loads_with_every_kernel_and_says_so(monkeypatch, smollm2_gguf):
    made = []

    class FakeLLM:
        def __init__(self, model, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(edgellm, "LLM", FakeLLM)
    monkeypatch.setattr(loading, "first_run", lambda engine: True)
    loading.load_llm(str(smollm2_gguf), {"warmup": False})
    monkeypatch.setattr(loading, "first_run", lambda engine: False)
    loading.load_llm(str(smollm2_gguf), {"warmup": False})
    assert [kw["warmup"] for kw in made] == [True, False]


def test_first_run_is_only_about_the_cpu_backend(monkeypatch):
    monkeypatch.setattr(cpu_warmup, "kernels_compiled", lambda: False)
    assert loading.first_run({"device": "cpu"}) and not loading.first_run({"device": "torch"})


def test_read_ahead_asks_the_os_for_each_weights_file(monkeypatch, tmp_path):
    advised = []
    monkeypatch.setattr(loading.os, "posix_fadvise", lambda fd, off, n, how: advised.append((os.fstat(fd).st_size, how)))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    folder = tmp_path / "hf"
    folder.mkdir()
    for name, size in (("a.safetensors", 3), ("b.safetensors", 4), ("config.json", 5)):
        (folder / name).write_bytes(b"x" * size)
    loading.read_ahead(model)
    loading.read_ahead(folder)
    loading.read_ahead(tmp_path / "missing.gguf")  # nothing to read: nothing happens
    assert advised == [(10, os.POSIX_FADV_WILLNEED), (3, os.POSIX_FADV_WILLNEED), (4, os.POSIX_FADV_WILLNEED)]


def test_spinner_shows_a_message_changed_inside_the_block():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with loading.spinner("loading m", stream=out, interval=0.01) as status:
        status.message += ": compiling"
        time.sleep(0.1)
    assert "loading m: compiling (" in out.getvalue()


def test_an_int8_cache_warms_its_own_kernels(monkeypatch):
    """Kernels compile per cache dtype: a warmed backend allocating an int8 pool runs the cache steps on
    an int8 cache too (a bf16 pool's were run at start-up; a lazy backend leaves them to first use)."""
    import torch

    assert cpu_warmup.warm_up_cache(WARM, torch.int8) >= 0  # the real steps, on a one-block int8 cache
    seen = []
    real = cpu_warmup.cache_steps
    monkeypatch.setattr(cpu_warmup, "cache_steps", lambda b, cache: seen.append(cache().dtype) or real(b, cache))
    lazy = CPUBackend(threads=2, warmup=False)
    for backend, dtype in ((WARM, torch.bfloat16), (lazy, torch.int8), (WARM, torch.int8)):
        [cache] = backend.allocate_kv_cache(1, 2, 16, 1, 64, dtype)
        assert cache.dtype == dtype and cache.shape[-1] == (68 if dtype == torch.int8 else 64)
    assert seen == [torch.int8]
