"""CPUBackend ops against TorchBackend: quantized linears, embeddings, prepared weights."""
from __future__ import annotations

import pytest
import torch

from edgellm.backends.cpu import CPUBackend, Int4PackedWeight, Q8_0Weight
from edgellm.backends.torch_ref import TorchBackend
from edgellm.kernels.cpu.int4_gemv import quantize_groups_int16_f32
from edgellm.kernels.cpu.q8_0 import q8_0_matmul
from edgellm.kernels.cpu.q8_0_gemv import supports as q8_0_gemv_supports
from edgellm.quant import QuantizedTensor
from edgellm.quant.formats import quantize_rows

REF = TorchBackend()
CPU = CPUBackend(threads=2, batch_invariant=False)
INVARIANT = CPUBackend(threads=2, batch_invariant=True, warmup=False)


def quantized(fmt: str, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return QuantizedTensor(fmt, quantize_rows(fmt, w), (n, k))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("n, k", [(576, 1536), (1536, 576)])
@pytest.mark.parametrize("m", [1, 3, 17, 33, 64])  # both sides of the int4-kernel / bf16-GEMM switch
@pytest.mark.parametrize("backend", [CPU, INVARIANT], ids=["default", "invariant"])
def test_quantized_linear_matches_reference(fmt, n, k, m, backend):
    w = quantized(fmt, n, k)
    prepared = backend.prepare_weight(w, torch.float32)
    assert isinstance(prepared, Q8_0Weight if fmt == "Q8_0" else Int4PackedWeight)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    want = REF.linear(x, w, bias)
    got = backend.linear(x, prepared, bias)
    if fmt == "Q8_0" and not q8_0_gemv_supports(k):  # float32 products throughout
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    elif fmt == "Q8_0":  # activations as int16 in groups of 32 (q8_0_gemv), exact block sums, float32 after
        xq, xs, _ = quantize_groups_int16_f32(x.numpy())
        used = torch.from_numpy(xq).float().view(m, -1, 32) * torch.from_numpy(xs)[:, :, None]
        assert ((used.view(m, k) - x).abs().view(m, -1, 32) <= 0.51 * torch.from_numpy(xs)[:, :, None]).all()
        want_used = REF.linear(used.view(m, k), w, bias)
        torch.testing.assert_close(got, want_used, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    else:  # the int4 paths take bf16 activations by design: compare against the bf16-rounded input
        want16 = REF.linear(x.bfloat16().float(), w, bias)
        torch.testing.assert_close(got, want16, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_int4_rows_are_batch_invariant_in_invariant_mode():
    """Generated rows through the int4 kernel, prompt rows through the fp32 tiles: a row's numbers
    do not depend on how many rows share its step."""
    from edgellm.backends.base import AttentionMetadata

    w = INVARIANT.prepare_weight(quantized("Q4_1", 576, 1536), torch.float32)
    x = torch.randn(70, 1536)

    def step(rows: int, decodes: int) -> torch.Tensor:
        meta = AttentionMetadata(torch.zeros(rows, dtype=torch.long), torch.zeros(2, dtype=torch.int32),
                                 torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), 16, 1,
                                 1, num_decode_tokens=decodes)
        INVARIANT.begin_step(meta)
        return INVARIANT.linear(x[:rows], w)

    alone, crowd = step(1, 1), step(40, 40)
    assert torch.equal(crowd[:1], alone)
    prompt_alone, mixed = step(70, 0), step(70, 6)
    assert torch.equal(mixed[6:], prompt_alone[6:])


def test_q8_0_rows_are_batch_invariant_in_invariant_mode(monkeypatch):
    """A Q8_0 linear's row has the same numbers alone and among more rows than the fast kernel's
    usual limit (where the default mode changes kernels)."""
    import edgellm.backends.cpu as cpu_backend

    monkeypatch.setattr(cpu_backend, "Q8_0_GEMV_MAX_ROWS", 8)
    w = INVARIANT.prepare_weight(quantized("Q8_0", 96, 576, seed=5), torch.float32)
    x = torch.randn(40, 576)
    alone, crowd = INVARIANT.linear(x[:1], w), INVARIANT.linear(x, w)
    assert torch.equal(crowd[:1], alone)
    if q8_0_gemv_supports(576):  # the default mode switches to float32 past the limit
        assert not torch.equal(CPU.linear(x, CPU.prepare_weight(quantized("Q8_0", 96, 576, seed=5),
                                                                torch.float32))[:1], alone)


def test_q8_0_linear_keeps_leading_dims_and_dtype():
    w = quantized("Q8_0", 96, 64)
    prepared = CPU.prepare_weight(w, torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    got = CPU.linear(x, prepared)
    assert got.shape == (2, 5, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), REF.linear(x.float(), w).bfloat16().float(), rtol=1e-2, atol=1e-2)


def test_q8_0_lm_head_shape_quick_subset():
    w = quantized("Q8_0", 49152, 576, seed=1)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(1))
    x[0, 5] = 60.0  # an outlier, as final hidden states have: it coarsens its own group only
    got = CPU.linear(x, CPU.prepare_weight(w, torch.float32))
    rows = torch.arange(0, 49152, 61)
    want = x @ w.rows(rows).t()
    if not q8_0_gemv_supports(576):  # the float32 kernel
        torch.testing.assert_close(got[:, rows], want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        return
    xq, xs, _ = quantize_groups_int16_f32(x.numpy())
    used = (torch.from_numpy(xq).float().view(1, -1, 32) * torch.from_numpy(xs)[:, :, None]).view(1, 576)
    # float32 sums in another order: off by a few ulps of the largest terms, not of a small total
    scale = (used.abs() @ w.rows(rows).abs().t()).max().item()
    torch.testing.assert_close(got[:, rows], used @ w.rows(rows).t(), rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(got[:, rows], want, rtol=0, atol=2e-4 * want.abs().max().item())


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_from_original_and_prepared_weights(fmt, dtype):
    """A tied embedding may arrive as the original QuantizedTensor or as the lm_head's prepared one."""
    w = quantized(fmt, 300, 96, seed=2)
    ids = torch.tensor([[3, 299, 0], [3, 150, 17]])
    want = REF.embedding(ids, w, dtype)
    assert torch.equal(CPU.embedding(ids, w, dtype), want)
    if fmt == "Q8_0":
        assert torch.equal(CPU.embedding(ids, CPU.prepare_weight(w, dtype), dtype), want)


def test_dense_weights_fall_through_to_aten():
    w = torch.randn(40, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(CPU.linear(x, CPU.prepare_weight(w, torch.float32)), REF.linear(x, w))
    ids = torch.tensor([1, 39])
    assert torch.equal(CPU.embedding(ids, w, torch.float32), REF.embedding(ids, w, torch.float32))


def _fp32_logits(x: torch.Tensor, head: Q8_0Weight) -> torch.Tensor:
    """A Q8_0 head's logits in float32 products and sums (``q8_0_matmul``)."""
    out = torch.empty(x.shape[0], head.shape[0])
    q8_0_matmul(x.float().contiguous().numpy(), head.qs, head.d, out.numpy(), 2)
    return out


def _near_tie_head(n: int, k: int, seed: int = 0) -> tuple[QuantizedTensor, torch.Tensor]:
    """A Q8_0 head whose rows are tiny perturbations of a few shared rows, and hidden states that
    make many logits tie within the int8 copy's error: the hard case for an approximate argmax."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, k, generator=g) * 0.05
    w = base[torch.arange(n) % 8] + torch.randn(n, k, generator=g) * 1e-4
    w[3, 7] = 2.0  # one large weight: row 3's per-row int8 copy is coarse
    x = torch.cat([base[:4] * 30.0, torch.randn(4, k, generator=g) * 3.0])
    x[:, 7] = 0.0
    x[:, 5] += 60.0  # an outlier dimension, as final hidden states have
    return QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (n, k)), x


@pytest.mark.parametrize("rows", [1, 8])
def test_argmax_only_logits_keep_the_exact_argmax(rows):
    wq, x = _near_tie_head(2048, 576)
    be = CPUBackend(threads=2, warmup=False)
    head = be.prepare_weight(wq, torch.float32, "lm_head")
    assert head.argmax_head is not None
    exact = _fp32_logits(x[:rows], head)  # what q8_0_rescore recomputes candidates as
    fast = be.logits(x[:rows], head, argmax_cols=2048)
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
    # entries that could be the maximum are recomputed exactly; the rest stay below it
    top = exact.max(-1, keepdim=True).values
    recomputed = fast == exact
    assert recomputed.sum(-1).ge(1).all()
    assert (fast[~recomputed] < top.expand_as(fast)[~recomputed]).all()
    # only the first argmax_cols columns are the caller's: the argmax over them stays exact
    part = be.logits(x[:rows], head, argmax_cols=1000)
    assert torch.equal(part[:, :1000].argmax(-1), exact[:, :1000].argmax(-1))
    # greedy steps take the tokens straight from the re-scoring (1000: a ragged last chunk)
    assert torch.equal(be.greedy_tokens(x[:rows], head, 2048), exact.argmax(-1))
    assert torch.equal(be.greedy_tokens(x[:rows], head, 1000), exact[:, :1000].argmax(-1))


def test_greedy_tokens_take_the_first_of_equal_maxima():
    w = torch.randn(600, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    w[[70, 300, 599]] = w[5].clone()  # four identical rows: four equal maximum logits
    wq = QuantizedTensor("Q8_0", quantize_rows("Q8_0", w), (600, 64))
    be = CPUBackend(threads=2, warmup=False)
    head = be.prepare_weight(wq, torch.float32, "lm_head")
    x = wq.dequantize()[[5, 5, 5, 5]] * 20
    assert be.greedy_tokens(x, head, 600).tolist() == [5] * 4
    assert be.greedy_tokens(x, head, 600).tolist() == REF.logits(x, wq).argmax(-1).tolist()


def test_argmax_only_logits_fall_back_to_exact_when_not_allowed():
    wq, x = _near_tie_head(512, 64)
    be = CPUBackend(threads=2, warmup=False)
    head = be.prepare_weight(wq, torch.float32, "lm_head")
    exact = be.logits(x, head)
    assert torch.equal(be.logits(x, head, argmax_cols=None), exact)  # logprobs, sampling: all exact
    inv = CPUBackend(threads=2, warmup=False, batch_invariant=True)
    assert torch.equal(inv.logits(x, head, argmax_cols=512), exact)  # invariant mode: exact head
    plain = be.prepare_weight(wq, torch.float32, "embedding")
    assert plain.argmax_head is None  # an input embedding alone carries no int8 copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_outputs_hand_their_array_to_the_next_kernel(dtype):
    """A tensor from ``_new_array`` gives back the array it was made from; its views and other tensors
    convert afresh; all share the tensor's memory."""
    from edgellm.backends.cpu import _as_numpy, _new_array

    t, a = _new_array((2, 64), dtype)
    assert t.dtype == dtype and _as_numpy(t) is a
    t.fill_(1.5)  # writes through torch show in the array (1.5 is exact in bf16)
    want = torch.full((2, 64), 1.5, dtype=dtype)
    assert torch.equal(torch.from_numpy(_as_numpy(t).copy()).view(dtype), want)
    view = t[1:]
    got = _as_numpy(view)
    assert got is not a and got.shape == (1, 64) and got.ctypes.data == a[1:].ctypes.data
    other = torch.ones(3, 4, dtype=dtype)
    assert _as_numpy(other).ctypes.data == other.data_ptr()
