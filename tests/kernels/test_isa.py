"""The kernels follow the instruction set Numba compiles for, not only the host's: an AVX2-only target
(a laptop's, tried here with ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``) gets AVX2 code and answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from numba.core import config

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.kernels.cpu import dpbf16, int4_gemv, int8_gemv, isa, q8_0_gemv
from tests.kernels.test_bf16_expand import quantized

HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+sse,"
           "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


def test_parse_features():
    assert isa.parse_features("+avx2, -avx512f,+fma,,junk") == {"avx2": True, "avx512f": False, "fma": True}


@pytest.fixture
def target(monkeypatch):
    """Set Numba's target features for one test; the cached answers are dropped before and after."""
    caches = (isa.features, int4_gemv.isa, dpbf16.supported, int8_gemv.supported, q8_0_gemv.supported)

    def set_features(text):
        monkeypatch.setattr(config, "CPU_FEATURES", text)
        for f in caches:
            f.cache_clear()

    yield set_features
    monkeypatch.undo()
    for f in caches:
        f.cache_clear()


def test_an_avx2_target_gets_the_avx2_kernels_only(target):
    target(HASWELL)
    assert isa.has("avx2", "fma") and not isa.has("avx512f")
    assert int4_gemv.isa() == "avx2"
    assert not (dpbf16.supported() or int8_gemv.supported() or q8_0_gemv.supported())
    target("+sse2,+sse4.2")
    assert int4_gemv.isa() is None


def test_on_avx2_rows_past_the_int4_kernels_take_the_expanded_gemm(target, monkeypatch):
    target(HASWELL)  # nothing here compiles a kernel: Numba's cache must not keep code built for a fake target
    backend = CPUBackend(threads=2, warmup=False)
    assert backend._gemv_rows == cpu_backend.INT4_GEMV_AVX2_MAX_ROWS and not backend._dpbf16
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: pytest.fail("ATen's int4 kernel called"))
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 128, 64, seed=7))
    x = torch.randn(backend._gemv_rows + 4, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    torch.testing.assert_close(backend.linear(x, w).float(), x.float() @ w.expand_f32_t(), rtol=2e-2, atol=2e-2)


ANSWER = """
import json
from edgellm import LLM, SamplingParams
from edgellm.kernels.cpu import int4_gemv
from edgellm.kernels.cpu.decode_layers import decode_layers
llm = LLM({path!r}, threads=2)
backend = llm.engine.runner.backend
out = llm.chat([{{"role": "user", "content": "What is the capital of France?"}}],
               SamplingParams(temperature=0, max_tokens=12))
# 20 decodes a step: past int4_gemv's 16 rows, the expanded weight's GEMM
batch = llm.generate([f"Write the number {{i}} in words." for i in range(20)], SamplingParams(temperature=0, max_tokens=4))
stacks = [s[2][0].__name__ for s in backend._stacks.values() if s[2] is not None]
print(json.dumps({{"isa": int4_gemv.isa(), "gemv_rows": backend._gemv_rows, "stacks": stacks,
                   "text": out.outputs[0].text,
                   "batch": [len(o.outputs[0].token_ids) for o in batch]}}))
"""


@pytest.mark.slow
def test_an_avx2_only_target_answers_through_the_avx2_decode_path(smollm2_gguf, tmp_path):
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", ANSWER.format(path=str(smollm2_gguf))], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["isa"] == "avx2" and got["gemv_rows"] > 0
    assert got["stacks"] == ["decode_layers"]  # a decode step's layers in one call, on the AVX2 int4 kernel
    assert "Paris" in got["text"]
    assert got["batch"] == [4] * 20
