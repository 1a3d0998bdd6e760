"""A decode step's layers in one Numba call give the numbers of the ops one by one."""
from __future__ import annotations

from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch

from edgellm.backends import cpu as cpu_backend
from edgellm.backends.base import AttentionMetadata, Backend, DecoderLayer, DecoderShape
from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.amx import request_amx
from edgellm.kernels.cpu.decode_layers import decode_layers_dp
from edgellm.kernels.cpu.decode_layers_amx import decode_layers_amx
from edgellm.kernels.cpu.decode_step_spin import decode_layers_spin
from edgellm.kernels.cpu.dpbf16 import supported as dpbf16_supported
from edgellm.kernels.cpu.int4_gemv import supported as int4_gemv_supported
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows
from edgellm.quant.kv_int8 import dequantize_kv_rows, quantize_kv_rows
from tests.kernels.conftest import make_batch

H, HKV, D, HIDDEN, INTER, LAYERS = 4, 2, 64, 256, 384, 3

pytestmark = pytest.mark.skipif(not int4_gemv_supported(), reason="needs int4_gemv (AVX2, or AVX512-VNNI and VBMI)")


def _int4(n: int, k: int, seed: int, fmt: str = "Q4_1") -> QuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return QuantizedTensor(fmt, quantize_rows(fmt, w), (n, k))


def _layers(cpu: CPUBackend, fmt: str = "Q4_1") -> list[DecoderLayer]:
    g = torch.Generator().manual_seed(1)
    layers = []
    for i in range(LAYERS):
        def prep(n: int, k: int, s: int, i: int = i):
            return cpu.prepare_weight(_int4(n, k, 10 * i + s, fmt), torch.float32)

        qkv = prep((H + 2 * HKV) * D, HIDDEN, 0)
        gate_up = prep(2 * INTER, HIDDEN, 1)
        layers.append(DecoderLayer(
            input_norm=1 + 0.1 * torch.randn(HIDDEN, generator=g), qkv=qkv, qkv_bias=None,
            o_proj=prep(HIDDEN, H * D, 2), post_norm=1 + 0.1 * torch.randn(HIDDEN, generator=g),
            gate_up=gate_up, down=prep(HIDDEN, INTER, 3),
            qkv_in=cpu.linear_input_dtype(qkv, torch.float32), gate_up_in=cpu.linear_input_dtype(gate_up, torch.float32)))
    return layers


def _step(seqs, kv_dtype):
    """This step's metadata, one cache per layer (different contents, same blocks), the embeddings."""
    _, _, _, kv, meta = make_batch(seqs, H, HKV, D, 16, kv_dtype=kv_dtype, seed=4)
    if kv_dtype == torch.int8:  # rows of codes and their scales (quant.kv_int8)
        caches = [quantize_kv_rows(dequantize_kv_rows(kv) * (1 + 0.25 * i)) for i in range(LAYERS)]
    else:
        caches = [(kv.float() * (1 + 0.25 * i)).to(kv_dtype) for i in range(LAYERS)]
    t = int(meta.slot_mapping.shape[0])
    h = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(7))
    positions = torch.cat([torch.arange(ctx - nq, ctx) for ctx, nq in seqs])
    ang = torch.arange(1024)[:, None] * torch.rand(D // 2, generator=torch.Generator().manual_seed(5))
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1).float()
    return meta, caches, h, positions, cos_sin


def _both(cpu, layers, shape, seqs, kv_dtype):
    """``(fused, ops)``: each ``(h, residual, caches)`` after the same step on its own caches."""
    meta, caches, h, positions, cos_sin = _step(seqs, kv_dtype)
    runs = []
    for op in (type(cpu).decoder_layers, Backend.decoder_layers):
        kv = [c.clone() for c in caches]
        cpu.begin_step(meta)
        out, residual = op(cpu, h, layers, shape, kv, positions, cos_sin, meta)
        runs.append((out, residual, kv))
    return runs


DECODE_BATCHES = [[(37, 1)], [(300, 1), (5, 1)], [(1, 1), (16, 1), (17, 1), (90, 1), (260, 1)],
                  [(c, 1) for c in (3, 40, 64, 100, 129, 200, 257, 511)],  # int4_gemv's rows, then more
                  [(c, 1) for c in range(20, 29)], [(7 * c + 1, 1) for c in range(40)],
                  [(c, 1) for c in (600, 1000, 9, 530, 77, 64, 300, 515, 800)]]  # long ones split and merge


@pytest.mark.parametrize("seqs", DECODE_BATCHES, ids=lambda s: f"{len(s)}rows")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dpbf16", ["1", "0"], ids=["dpbf16-if-present", "avx512-attention"])
def test_one_call_gives_the_ops_numbers(seqs, kv_dtype, window, dpbf16, monkeypatch):
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setenv("EDGELLM_DPBF16", dpbf16)
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5, window)
    (out, res, kv), (want, want_res, want_kv) = _both(cpu, layers, shape, seqs, kv_dtype)
    if len(seqs) <= cpu._gemv_rows or (kv_dtype != torch.float32 and cpu._dpbf16):
        assert cpu._stacks[(id(layers), False)][2] is not None, "the step should have taken the one-call path"
    if len(seqs) > cpu._gemv_rows and kv_dtype != torch.float32 and cpu._dpbf16:  # on the widened weights
        assert all(layer[15].shape[0] for layer in cpu._stacks[(id(layers), True)][2][1])
    assert out.dtype == want.dtype == torch.bfloat16 and out.shape == (len(seqs), HIDDEN)
    assert torch.equal(out, want) and torch.equal(res, want_res)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))


def _one_region_against_a_region_per_kernel(amx: bool, seqs, kv_dtype, threads: int, workers: int, monkeypatch):
    """``decode_layers_spin`` (``workers`` workers on ``threads`` Numba threads) against the kernel the
    backend picks (``decode_layers_amx`` or ``decode_layers_dp``) on one thread, each on its own copy
    of the caches: the same output, residual and caches, bit for bit."""
    monkeypatch.setenv("EDGELLM_AMX", "1" if amx else "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5, None)
    meta, caches, h, positions, cos_sin = _step(seqs, kv_dtype)
    kernel = cpu._layer_stack(layers, shape, caches, cos_sin)[0]
    assert kernel is (decode_layers_amx if amx else decode_layers_dp)
    slots, starts, lens, tables = cpu._meta_arrays(meta)
    args = (h.numpy(), positions.numpy(), cos_sin.numpy(), slots, starts, lens, tables, D ** -0.5, 0, 1e-5, H, D)
    cfg = (cpu._amx_config,) if amx else ()
    runs = []
    for spin in (False, True):
        kv = [c.clone() for c in caches]
        residual = np.zeros((h.shape[0], HIDDEN), np.float32)
        step = (args[0], residual, cpu._layer_stack(layers, shape, kv, cos_sin)[1], *args[1:])
        if spin:
            before = numba.get_num_threads()
            numba.set_num_threads(threads)
            try:
                out = decode_layers_spin(*step, workers, cpu._gemv_rows, *cfg)
            finally:
                numba.set_num_threads(before)
        else:
            out = kernel(*step, 1, 1, cpu._gemv_rows, 1, *(cfg or (len(lens),)))
        runs.append((out, residual, kv))
    (want, want_res, want_kv), (out, res, kv) = runs
    assert np.array_equal(out, want) and np.array_equal(res, want_res)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))


@pytest.mark.skipif(not dpbf16_supported(), reason="needs AVX512-BF16 (decode_layers_dp)")
@pytest.mark.parametrize("threads,workers", [(2, 2), (1, 2), (1, 3), (2, 3)])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("seqs", [DECODE_BATCHES[-1], DECODE_BATCHES[2], DECODE_BATCHES[0]],
                         ids=lambda s: f"{len(s)}rows")
def test_one_region_gives_the_layer_by_layer_numbers_however_its_workers_run(threads, workers, kv_dtype, seqs,
                                                                             monkeypatch):
    """``decode_layers_spin`` against ``decode_layers_dp`` on one thread (a region per kernel), with
    as many Numba threads as workers, fewer (workers run one after the other and must not wait on
    each other), and more workers than threads."""
    _one_region_against_a_region_per_kernel(False, seqs, kv_dtype, threads, workers, monkeypatch)


@pytest.mark.skipif(not request_amx(), reason="needs AMX-BF16")
@pytest.mark.parametrize("threads,workers", [(2, 2), (1, 2), (2, 3)])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("seqs", [DECODE_BATCHES[5], DECODE_BATCHES[-1], DECODE_BATCHES[0]],
                         ids=lambda s: f"{len(s)}rows")
def test_one_region_on_amx_gives_the_layer_by_layer_numbers(threads, workers, kv_dtype, seqs, monkeypatch):
    """``decode_layers_spin`` with a tile configuration against ``decode_layers_amx`` on one thread (a
    region per kernel): 40 rows on AMX tiles (padded to whole 16-row tiles), 9 and 1 on int4_gemv."""
    _one_region_against_a_region_per_kernel(True, seqs, kv_dtype, threads, workers, monkeypatch)


@pytest.mark.skipif(not request_amx(), reason="needs AMX-BF16")
@pytest.mark.parametrize("seqs", DECODE_BATCHES, ids=lambda s: f"{len(s)}rows")
@pytest.mark.parametrize("window", [None, 20])
def test_one_call_on_amx_gives_the_ops_numbers(seqs, window, monkeypatch):
    """On AMX CPUs the bf16 cache's steps take ``decode_layers_amx`` (int4_gemv, then AMX tiles)."""
    monkeypatch.setenv("EDGELLM_AMX", "1")
    cpu = CPUBackend(threads=2, warmup=False)
    assert cpu.uses_amx
    layers = _layers(cpu)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5, window)
    (out, res, kv), (want, want_res, want_kv) = _both(cpu, layers, shape, seqs, torch.bfloat16)
    assert cpu._stacks[(id(layers), False)][2][0] is decode_layers_amx
    assert torch.equal(out, want) and torch.equal(res, want_res)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))


@pytest.mark.skipif(not dpbf16_supported(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("fit", [0, 1, LAYERS])
def test_batched_decode_steps_widen_the_layers_their_budget_holds(fit, monkeypatch):
    """A batched decode step reads the first layers' projections widened to bf16, as many as the
    budget holds (the rest widen panel by panel as before): the ops' numbers either way. One stream
    alone never widens anything."""
    monkeypatch.setenv("EDGELLM_AMX", "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    per_layer = sum(2 * w.shape[0] * w.shape[1] for w in (layers[0].qkv, layers[0].o_proj, layers[0].gate_up,
                                                         layers[0].down))
    monkeypatch.setattr(cpu_backend, "wide_weights_budget", lambda: fit * per_layer + per_layer // 2)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5)
    _both(cpu, layers, shape, [(37, 1)], torch.bfloat16)
    assert not any("wide_panels" in w.__dict__ for layer in layers for w in (layer.qkv, layer.down))
    (out, res, kv), (want, want_res, want_kv) = _both(cpu, layers, shape, DECODE_BATCHES[-2], torch.bfloat16)
    typed = cpu._stacks[(id(layers), True)][2][1]
    assert [typed[i][15].shape[0] > 0 for i in range(LAYERS)] == [i < fit for i in range(LAYERS)]
    assert sum(w.cache_nbytes - w.gemv_operands[1].nbytes for layer in layers
               for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)) == fit * per_layer
    assert torch.equal(out, want) and torch.equal(res, want_res)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))


@pytest.mark.skipif(not dpbf16_supported(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("max_num_seqs, threads", [(1, 2), (32, 2), (32, 1)])
def test_engines_that_batch_widen_their_weights_at_start(max_num_seqs, threads, monkeypatch):
    """``prepare_batching`` (the engine calls it once built) widens what batched decode steps will read,
    and nothing for an engine of fewer streams than ``int4_gemv``'s rows or on one thread (whose steps
    take the ops layer by layer); the first step reuses it. A stack rebuilt for new caches widens no more."""
    monkeypatch.setenv("EDGELLM_AMX", "0")
    cpu = CPUBackend(threads=threads, warmup=False)
    layers = _layers(cpu)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5)
    meta, caches, h, positions, cos_sin = _step(DECODE_BATCHES[-2], torch.bfloat16)
    cpu.prepare_batching(SimpleNamespace(layers=layers, shape=shape, cos_sin=cos_sin), caches, max_num_seqs)
    batched = max_num_seqs > cpu._gemv_rows and threads > 1
    assert all(("wide_panels" in w.__dict__) == batched for layer in layers for w in (layer.qkv, layer.down))
    if batched:
        stack = cpu._stacks[(id(layers), True)][2]
        cpu.begin_step(meta)
        cpu.decoder_layers(h, layers, shape, caches, positions, cos_sin, meta)
        assert cpu._stacks[(id(layers), True)][2] is stack
        per_layer = sum(2 * w.shape[0] * w.shape[1] for w in (layers[0].qkv, layers[0].o_proj, layers[0].gate_up,
                                                             layers[0].down))
        monkeypatch.setattr(cpu_backend, "wide_weights_budget", lambda: per_layer)  # one layer's worth
        cpu._stacks.clear()
        assert cpu._wide_layers(layers) == 1


def test_wide_weights_budget_follows_the_environment(monkeypatch):
    monkeypatch.setenv("EDGELLM_WIDE_WEIGHTS_MB", "0")
    assert cpu_backend.wide_weights_budget() == 0
    monkeypatch.setenv("EDGELLM_WIDE_WEIGHTS_MB", "300")
    assert cpu_backend.wide_weights_budget() == 300 << 20
    monkeypatch.delenv("EDGELLM_WIDE_WEIGHTS_MB")
    assert 0 < cpu_backend.wide_weights_budget() <= 1 << 30


def test_new_caches_rebuild_the_stack(monkeypatch):
    """A second set of caches (a re-allocated pool) is written, not the first one's."""
    monkeypatch.setenv("EDGELLM_AMX", "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu, "Q4_0")
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5)
    for seqs in ([(37, 1), (12, 1)], [(70, 1)]):
        (out, _, kv), (want, _, want_kv) = _both(cpu, layers, shape, seqs, torch.bfloat16)
        assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(kv, want_kv))


MIXED_BATCHES = [[(40, 1), (70, 30)], [(c, 1) for c in range(20, 29)] + [(100, 50)], [(64, 64)],
                 [(3, 1), (200, 60), (30, 30)], [(7 * c + 1, 1) for c in range(31)] + [(17, 17)]]


@pytest.mark.skipif(not dpbf16_supported(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("seqs", MIXED_BATCHES, ids=lambda s: f"{len(s)}seqs-{sum(n for _, n in s)}rows")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_steps_with_prompt_rows_in_one_call_give_the_ops_numbers(seqs, kv_dtype, monkeypatch):
    """Decodes and prompt chunks together (a new request joining running ones, or prompts alone) run
    in ``decode_layers_dp`` on AVX512-BF16 CPUs: the numbers and caches of the ops one by one."""
    monkeypatch.setenv("EDGELLM_AMX", "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    (out, res, kv), (want, want_res, want_kv) = _both(cpu, layers, DecoderShape(H, HKV, D, 1e-5, D ** -0.5), seqs,
                                                      kv_dtype)
    assert cpu._stacks[(id(layers), False)][2][0] is decode_layers_dp, "the step should have taken the one-call path"
    assert torch.equal(out, want) and torch.equal(res, want_res)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))


@pytest.mark.skipif(not request_amx(), reason="needs AMX-BF16")
@pytest.mark.parametrize("seqs", MIXED_BATCHES + [[(9, 1), (4, 3)], [(5, 5)], [(300, 1), (250, 2), (40, 40)],
                                           [(30, 1), (400, 290)]],
                         ids=lambda s: f"{len(s)}seqs-{sum(n for _, n in s)}rows")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_steps_with_prompt_rows_in_one_region_on_amx_give_the_ops_numbers(seqs, kv_dtype, monkeypatch):
    """On AMX CPUs (two threads) a step with prompt chunks runs in ``decode_layers_amx``'s one region:
    decodes on the decode tiles, prompts on ``prompt_attention_amx``'s (an int8 cache's rows
    dequantized as it does op by op), the numbers and caches of the ops one by one; one thread takes
    the ops."""
    monkeypatch.setenv("EDGELLM_AMX", "1")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5)
    calls = []
    monkeypatch.setattr(cpu_backend, "decode_layers_amx", lambda *a: calls.append(a[-1]) or decode_layers_amx(*a))
    (out, res, kv), (want, want_res, want_kv) = _both(cpu, layers, shape, seqs, kv_dtype)
    assert calls == [sum(1 for _, n in seqs if n == 1)], "the step should have taken the one-region path"
    assert torch.equal(out, want) and torch.equal(res, want_res)
    assert all(torch.equal(a, b) for a, b in zip(kv, want_kv))
    one = CPUBackend(threads=1, warmup=False)
    assert not one._prompts_fuse(shape, kv, len(seqs))


def test_the_step_budget_on_amx_is_what_one_region_takes(monkeypatch):
    """The engine's default budget: on AMX the most rows whose every linear stays on tiles (here 2**20
    // 384 inputs of the down projection, capped at 1,024), where the one region takes prompt steps;
    elsewhere (no AMX, a sliding window, one thread) the backend's own."""
    monkeypatch.setenv("EDGELLM_AMX", "1")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    _, caches, _, _, cos_sin = _step([(40, 1)], torch.bfloat16)
    model = SimpleNamespace(layers=layers, shape=DecoderShape(H, HKV, D, 1e-5, D ** -0.5), cos_sin=cos_sin)
    if not request_amx():  # no one-region prompt steps to size the budget for
        assert cpu.step_tokens(model, caches) == cpu.capabilities().step_tokens
        return
    assert cpu.step_tokens(model, caches) == cpu_backend.AMX_MATMUL_MAX_ROWS == 1024
    assert cpu._tiles_take(layers, 1024) and not cpu._tiles_take(layers, 1025)
    model.shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5, 20)  # a sliding window: prompt steps go op by op
    assert cpu.step_tokens(model, caches) == cpu.capabilities().step_tokens == 2048
    one = CPUBackend(threads=1, warmup=False)
    model = SimpleNamespace(layers=_layers(one), shape=DecoderShape(H, HKV, D, 1e-5, D ** -0.5), cos_sin=cos_sin)
    assert one.step_tokens(model, caches) == 2048


@pytest.mark.parametrize("seqs", [[(40, 1), (70, 30)], [(c, 1) for c in range(20, 29)]], ids=["prompt", "9rows"])
def test_other_steps_take_the_ops(seqs, monkeypatch):
    """Prompt rows, and without AVX512-BF16 batches past int4_gemv's rows, go op by op: nothing is
    built for them."""
    monkeypatch.setenv("EDGELLM_AMX", "0")
    monkeypatch.setenv("EDGELLM_DPBF16", "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    (out, res, _), (want, want_res, _) = _both(cpu, layers, DecoderShape(H, HKV, D, 1e-5, D ** -0.5), seqs,
                                               torch.bfloat16)
    assert (id(layers), False) not in cpu._stacks
    assert torch.equal(out, want) and torch.equal(res, want_res)


def test_unsupported_layers_fall_back(monkeypatch):
    """A layer with a qkv bias (Qwen2) or dense weights runs op by op, with the same numbers."""
    monkeypatch.setenv("EDGELLM_AMX", "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    layers[1].qkv_bias = torch.zeros((H + 2 * HKV) * D, dtype=torch.bfloat16)
    (out, _, _), (want, _, _) = _both(cpu, layers, DecoderShape(H, HKV, D, 1e-5, D ** -0.5), [(9, 1)],
                                      torch.bfloat16)
    assert cpu._stacks[(id(layers), False)][2] is None
    assert torch.equal(out, want)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("EDGELLM_FUSED_LAYERS", "0")
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    (out, _, _), (want, _, _) = _both(cpu, layers, DecoderShape(H, HKV, D, 1e-5, D ** -0.5), [(9, 1)],
                                      torch.bfloat16)
    assert not cpu._stacks and torch.equal(out, want)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_rows_verified_together_give_the_numbers_of_decoding_them_one_by_one(kv_dtype):
    """A step whose sequences feed back a token plus speculative drafts (a few rows each) against
    the same rows decoded one step at a time: on the one-region path every row attends as a decode
    over the keys up to its own and takes ``int4_gemv`` as one row would, so outputs, residuals and
    caches match bit for bit (what makes greedy speculative decoding say what plain decoding says)."""
    cpu = CPUBackend(threads=2, warmup=False)
    layers = _layers(cpu)
    shape = DecoderShape(H, HKV, D, 1e-5, D ** -0.5, None)
    seqs = [(37, 1), (300, 3), (600, 2), (20, 2)]  # 8 rows: int4_gemv's on every CPU that has it
    meta, caches, h, positions, cos_sin = _step(seqs, kv_dtype)
    stack = cpu._layer_stack(layers, shape, caches, cos_sin)
    if stack is None or stack[0] not in (decode_layers_amx, decode_layers_dp):
        pytest.skip("rows attend one by one on the one-region path (AMX or AVX512-BF16 CPUs)")
    meta.num_decode_tokens = h.shape[0]
    together = [c.clone() for c in caches]
    cpu.begin_step(meta)
    out, res = cpu.decoder_layers(h, layers, shape, together, positions, cos_sin, meta)

    apart = [c.clone() for c in caches]
    starts, slots = meta.query_start_loc_list, meta.slot_mapping
    got_out, got_res = torch.empty_like(out), torch.empty_like(res)
    for i in range(max(nq for _, nq in seqs)):
        rows = [starts[b] + i for b, (_, nq) in enumerate(seqs) if nq > i]
        picked = [b for b, (_, nq) in enumerate(seqs) if nq > i]
        lens = [ctx - (nq - 1 - i) for ctx, nq in (seqs[b] for b in picked)]
        step = AttentionMetadata(
            slot_mapping=slots[rows], query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=meta.block_tables[picked],
            block_size=meta.block_size, max_query_len=1, max_seq_len=max(lens), num_decode_tokens=len(rows),
            query_start_loc_list=list(range(len(rows) + 1)), seq_lens_list=lens)
        cpu.begin_step(step)
        o, r = cpu.decoder_layers(h[rows].contiguous(), layers, shape, apart, positions[rows].contiguous(), cos_sin,
                                  step)
        got_out[rows], got_res[rows] = o, r
    assert torch.equal(out, got_out) and torch.equal(res, got_res)
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
