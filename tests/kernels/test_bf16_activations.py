"""The CPU backend's bf16 activation path: norms, rotary and the gated MLP read and write bf16 bits
with float32 arithmetic, so each equals the float32 op rounded once (and the torch reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.backends.cpu import CPUBackend, Int4PackedWeight
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.activations import silu_and_mul, silu_and_mul_parallel
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows

REF = TorchBackend()
CPU = CPUBackend(threads=2, warmup=False, batch_invariant=False)
BF16 = torch.bfloat16


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("rows", [1, 5, 40])  # 40: rows split among threads
@pytest.mark.parametrize("x_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_writes_bf16_as_the_float32_norm_rounded(rows, x_dtype, with_residual):
    x = _rand(rows, 576, seed=1, scale=3).to(x_dtype)
    w = _rand(576, seed=2).abs() + 0.5
    res = _rand(rows, 576, seed=3) if with_residual else None
    y32, r32 = CPU.rms_norm(x, w, 1e-5, None if res is None else res.clone(), torch.float32)
    y16, r16 = CPU.rms_norm(x, w, 1e-5, None if res is None else res.clone(), BF16)
    assert y16.dtype == BF16 and r16.dtype == torch.float32 and y32.dtype == torch.float32
    assert torch.equal(y16, y32.to(BF16))  # one rounding, to nearest even, as torch rounds
    assert torch.equal(r16, r32)
    want, want_res = REF.rms_norm(x, w, 1e-5, res, BF16)
    assert want.dtype == BF16
    torch.testing.assert_close(y16.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(r16, want_res.float(), rtol=0, atol=0)


def test_rotary_widens_bf16_views_of_the_projection():
    t, h, hk, d = 3, 6, 2, 64
    qkv = _rand(t, (h + 2 * hk) * d, seed=4).to(BF16)
    q, k, _ = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k = q.reshape(t, h, d), k.reshape(t, hk, d)
    pos = torch.tensor([0, 7, 300])
    ang = torch.arange(512)[:, None] * torch.rand(d // 2, generator=torch.Generator().manual_seed(5))
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1).float()
    q_got, k_got = CPU.rotary(q, k, pos, cos_sin)
    assert q_got.dtype == k_got.dtype == torch.float32
    assert q.dtype == BF16 and torch.equal(qkv[:, :h * d].reshape(t, h, d), q)  # inputs untouched
    q_want, k_want = CPU.rotary(q.float().contiguous(), k.float().contiguous(), pos, cos_sin)
    assert torch.equal(q_got, q_want) and torch.equal(k_got, k_want)
    q_ref, k_ref = REF.rotary(q.float(), k.float(), pos, cos_sin)
    torch.testing.assert_close(q_got, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_got, k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 33])  # both sides of the serial / parallel switch
def test_silu_and_mul_matches_torch_in_float32_and_bf16(rows):
    x = _rand(rows, 2 * 1536, seed=6, scale=4)
    x[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 20.0, -20.0])  # edges of exp's range
    want = REF.act_and_mul(x, "silu")
    got = CPU.act_and_mul(x, "silu")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    xb = x.to(BF16)
    got_b = CPU.act_and_mul(xb, "silu")
    want_b = REF.act_and_mul(xb.float(), "silu").to(BF16)
    assert got_b.dtype == BF16
    differ = (got_b != want_b)
    # the float32 results agree to ~2 ulp, so a bf16 rounding differs at most rarely, by one step
    assert differ.float().mean() < 1e-3
    torch.testing.assert_close(got_b.float(), want_b.float(), rtol=2 ** -7, atol=1e-30)


def test_silu_and_mul_serial_and_parallel_agree_bit_for_bit():
    x = _rand(9, 2 * 96, seed=7, scale=5).to(BF16)
    a = torch.empty(9, 96, dtype=BF16)
    b = torch.empty(9, 96, dtype=BF16)
    silu_and_mul(x.view(torch.uint16).numpy(), a.view(torch.uint16).numpy())
    for threads in (2, 3, 16):  # more threads than rows too
        silu_and_mul_parallel(x.view(torch.uint16).numpy(), b.view(torch.uint16).numpy(), threads)
        assert torch.equal(a, b)


def test_other_activations_fall_back_to_the_reference():
    x = _rand(2, 64, seed=8).to(BF16)
    torch.testing.assert_close(CPU.act_and_mul(x, "gelu_pytorch_tanh"), REF.act_and_mul(x, "gelu_pytorch_tanh"))


@pytest.mark.parametrize("rows", [1, 40])
def test_int4_linear_takes_bf16_in_and_gives_bf16_out(rows):
    w = QuantizedTensor("Q4_1", quantize_rows("Q4_1", _rand(128, 256, seed=9) * 0.05), (128, 256))
    packed = CPU.prepare_weight(w, torch.float32)
    assert isinstance(packed, Int4PackedWeight)
    assert CPU.linear_input_dtype(packed, torch.float32) == BF16
    assert CPU.linear_input_dtype(torch.zeros(2, 2), torch.float32) == torch.float32
    x = _rand(rows, 256, seed=10).to(BF16)
    y = CPU.linear(x, packed)
    y32 = CPU.linear(x.float(), packed)
    assert y.dtype == BF16 and y32.dtype == torch.float32
    assert torch.equal(y.float(), y32)  # the float32 path rounds to bf16 inside: no second rounding
    assert np.isfinite(y.float().numpy()).all()


@pytest.mark.parametrize("threads", [2, 3])
def test_row_parallel_norm_rotary_and_cache_writes_match_serial_bit_for_bit(threads):
    from edgellm.kernels.cpu.norm_rope import (
        add_rms_norm,
        add_rms_norm_parallel,
        rope_neox,
        rope_neox_parallel,
    )
    from edgellm.kernels.cpu.paged_attention import write_kv, write_kv_parallel

    t, h, hk, d = 37, 6, 2, 64
    x = _rand(t, 576, seed=1).to(BF16).view(torch.uint16).numpy()
    w = (_rand(576, seed=2).abs() + 0.5).numpy()
    res_a, res_b = _rand(t, 576, seed=3).numpy(), _rand(t, 576, seed=3).numpy()
    out_a, out_b = np.empty((t, 576), np.uint16), np.empty((t, 576), np.uint16)
    add_rms_norm(x, res_a, w, 1e-5, out_a, True)
    add_rms_norm_parallel(x, res_b, w, 1e-5, out_b, True, threads)
    assert np.array_equal(out_a, out_b) and np.array_equal(res_a, res_b)

    qkv = _rand(t, (h + 2 * hk) * d, seed=4).to(BF16).view(torch.uint16).numpy()
    q, k = qkv[:, :h * d].reshape(t, h, d), qkv[:, h * d:(h + hk) * d].reshape(t, hk, d)
    v = qkv[:, (h + hk) * d:].reshape(t, hk, d)
    pos = np.arange(t) * 3
    cos_sin = _rand(3 * t, d, seed=5).numpy()
    rot = [(np.empty((t, h, d), np.float32), np.empty((t, hk, d), np.float32)) for _ in range(2)]
    rope_neox(q, k, pos, cos_sin, *rot[0])
    rope_neox_parallel(q, k, pos, cos_sin, *rot[1], threads)
    assert np.array_equal(rot[0][0], rot[1][0]) and np.array_equal(rot[0][1], rot[1][1])

    slots = np.random.default_rng(0).permutation(64)[:t].astype(np.int64)
    slots[5] = -1  # padding: skipped
    caches = [np.zeros((2, 4, hk, 16, d), np.uint16) for _ in range(2)]
    write_kv(caches[0], rot[0][1], v, slots)
    write_kv_parallel(caches[1], rot[0][1], v, slots, threads)
    assert np.array_equal(caches[0], caches[1])
