"""The kernels follow the instruction set Numba compiles for, not only the host's: an AVX2-only target
(a laptop's, tried here with ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``) gets AVX2 code and answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import llvmlite.binding as llvm
import numpy as np
import pytest
import torch
from numba.core import config

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.cpu import CPUBackend
from edgellm.backends.cpu_weights import Int4PackedWeight
from edgellm.kernels.cpu import dpbf16, int4_gemv, int8_gemv, isa, q8_0_gemv
from tests.kernels.test_bf16_expand import quantized

HOST_AVX2 = bool(llvm.get_host_cpu_features().get("avx2"))  # the AVX2-target code runs here
HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+sse,"
           "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


def test_parse_features():
    assert isa.parse_features("+avx2, -avx512f,+fma,,junk") == {"avx2": True, "avx512f": False, "fma": True}


@pytest.fixture
def target(monkeypatch):
    """Set Numba's target features for one test; the cached answers are dropped before and after."""
    caches = (isa.features, int4_gemv.isa, dpbf16.supported, int8_gemv.supported)

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
    assert int4_gemv.isa() == "avx2" and isa.int16_dots() == "avx2"
    assert int8_gemv.runs() and q8_0_gemv.supported()  # their int16 dot products on vpmaddwd
    assert not (dpbf16.supported() or int8_gemv.supported())  # the AVX512-BF16 and VNNI-only kernels
    target("+sse2,+sse4.2")
    assert int4_gemv.isa() is None and not (int8_gemv.runs() or q8_0_gemv.supported())


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
@pytest.mark.skipif(not HOST_AVX2, reason="this CPU cannot run AVX2 code")
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


KERNELS = """
import numpy as np, sys
from edgellm.kernels.cpu.int4_gemv import int4_gemv, isa
from edgellm.kernels.cpu.int8_gemv import int8_gemv, quantize_rows_int16, xq_limit
from edgellm.kernels.cpu.int4_gemv import quantize_groups_int16_f32
from edgellm.kernels.cpu.q8_0_gemv import q8_0_gemv, q8_0_panels
d = dict(np.load(sys.argv[1]))
out = {{}}
for m in (1, 3, 9):
    x = d["x"][:m]
    o = np.empty((m, d["packed"].shape[0] * 64), np.uint16)
    int4_gemv(np.ascontiguousarray(d["xb"][:m]), d["packed"], d["sz"], o, 2)
    out[f"int4_{{m}}"] = o
    xq, s = quantize_rows_int16(x, xq_limit(x.shape[1]))
    o = np.empty((m, d["qw"].shape[0]), np.float32)
    int8_gemv(xq, s, d["qw"], d["scale"], o, 2)
    out[f"int8_{{m}}"] = o
    xq, xs, _ = quantize_groups_int16_f32(x)
    qp, dt = q8_0_panels(d["qs"], d["d"])
    o = np.empty((m, d["qs"].shape[0]), np.float32)
    q8_0_gemv(xq, xs, qp, dt, o, 2)
    out[f"q8_0_{{m}}"] = o
out["isa"] = np.array(isa())
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
@pytest.mark.skipif(not HOST_AVX2, reason="this CPU cannot run AVX2 code")
def test_the_avx2_kernels_give_the_host_kernels_bits(tmp_path):
    """int4_gemv, int8_gemv and q8_0_gemv built for an AVX2-only target against the same kernels built
    for this CPU (AVX-512 where it has it): exact integer sums and the same float steps, the same bits."""
    g = np.random.default_rng(0)
    w = Int4PackedWeight.from_quantized(quantized("Q4_1", 960, 576, seed=3))
    x = (g.standard_normal((9, 576)) * 3).astype(np.float32)
    packed, sz = w.gemv_operands
    data = {"x": x, "xb": torch.from_numpy(x).bfloat16().view(torch.uint16).numpy(), "packed": packed, "sz": sz,
            "qw": g.integers(-127, 128, (1000, 576), dtype=np.int8),
            "scale": g.random(1000, dtype=np.float32) * 0.01 + 1e-3,
            "qs": g.integers(-127, 128, (1000, 576), dtype=np.int8),
            "d": (g.random((1000, 18)) * 0.01 + 1e-3).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **data)
    script = tmp_path / "kernels.py"
    script.write_text(KERNELS.format())
    # fresh caches: Numba's cache does not notice a change in a helper module the kernels inline
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL,
           "NUMBA_CACHE_DIR": str(tmp_path / "nb-avx2")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / "avx2.npz")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    here = subprocess.run([sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / "host.npz")],
                          env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "nb-host")}, capture_output=True,
                          text=True, timeout=900)
    assert here.returncode == 0, here.stderr[-3000:]
    avx2, host = np.load(tmp_path / "avx2.npz"), np.load(tmp_path / "host.npz")
    assert str(avx2["isa"]) == "avx2"
    for key in host.files:
        if key != "isa":
            assert np.array_equal(avx2[key].view(np.uint8), host[key].view(np.uint8)), key
