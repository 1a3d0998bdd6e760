"""The real default model against Hugging Face transformers on the same GGUF weights."""
from __future__ import annotations

import logging

import pytest
import torch

from edgellm import SamplingParams
from edgellm.backends.cpu import wide_weights_budget
from edgellm.tokenizer import apply_chat_template
from tests.engine.util import forced_decode_logits, full_logits, hf_greedy

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="session")
def prompt_ids(fp32_llm):
    tok = fp32_llm.tokenizer
    ids = [tok(p, add_special_tokens=False).input_ids for p in RAW_PROMPTS]
    ids += [apply_chat_template(tok, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    return ids


@pytest.fixture(scope="session")
def hf_reference(smollm2_hf_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    return [hf_greedy(model, ids, NEW_TOKENS) for ids in prompt_ids]


def test_fp32_greedy_is_token_identical_to_transformers(fp32_llm, prompt_ids, hf_reference):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = fp32_llm.generate(prompt_ids, params)
    for ids, out, ref in zip(prompt_ids, outs, hf_reference):
        assert out.token_ids == ref, f"diverged for prompt {fp32_llm.tokenizer.decode(ids)!r}"


def test_q4_1_packed_weights_agree_with_fp32_reference(q4_llm, prompt_ids, hf_reference):
    agree = total = 0
    for ids, ref in zip(prompt_ids, hf_reference):
        logits = full_logits(q4_llm.engine, ids + ref)
        pred = logits[len(ids) - 1: len(ids) - 1 + len(ref)].argmax(-1).tolist()
        agree += sum(p == r for p, r in zip(pred, ref))
        total += len(ref)
    rate = agree / total
    log.warning("Q4_1 packed teacher-forced top-1 agreement with the fp32 reference: %.2f%% (%d/%d)",
                100 * rate, agree, total)
    assert rate >= 0.97


def test_int8_kv_cache_agrees_with_fp32_reference(smollm2_gguf, prompt_ids, hf_reference):
    """The int8 cache's rounding of K and V, through the prompt kernels (one teacher-forced prefill)
    and the decode kernels (one forced decode step per token). Measured: 98.2 % and 98.4 % here (the
    bf16 cache: 99.0 % and 99.2 %); over 40 prompts x 64 tokens, 98.5 % against 99.3 %."""
    from edgellm import LLM

    llm = LLM(str(smollm2_gguf), device="cpu", kv_cache_dtype="int8", kv_cache_memory=64 << 20)
    prefill = decode = total = 0
    for ids, ref in zip(prompt_ids, hf_reference):
        logits = full_logits(llm.engine, ids + ref)
        prefill += sum(p == r for p, r in zip(logits[len(ids) - 1: len(ids) - 1 + len(ref)].argmax(-1).tolist(), ref))
        decode += sum(p == r for p, r in zip(forced_decode_logits(llm.engine, ids, ref).argmax(-1).tolist(), ref))
        total += len(ref)
    log.warning("int8 KV cache teacher-forced top-1 agreement with the fp32 reference: prefill %.2f%%, "
                "decode %.2f%% (%d tokens)", 100 * prefill / total, 100 * decode / total, total)
    assert prefill / total >= 0.97 and decode / total >= 0.97


def _nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes


def test_q4_1_weights_stay_packed_within_1_3x_the_file(q4_llm, smollm2_gguf):
    model = q4_llm.engine.model
    layer = model.layers[0]
    for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
        assert not isinstance(w, torch.Tensor)  # packed int4, never a dense float copy
    weights = [model.embed, model.norm] + [
        w for layer in model.layers for w in (layer.input_norm, layer.qkv, layer.o_proj, layer.post_norm,
                                             layer.gate_up, layer.down)]
    # the head's re-laid copies come with the first batched greedy or sampled step (whether an earlier
    # test using this model ran one is beside the point here); they are bounded on their own below
    head = getattr(model.embed, "argmax_head", None)
    lazy = getattr(model.embed, "cache_nbytes", 0)
    # so does int4_gemv's copy of each int4 weight's scale-zeros, block by block (a decode's first step)
    int4 = [w for layer in model.layers for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    copies = sum(getattr(w, "cache_nbytes", 0) for w in int4)
    resident = sum(_nbytes(w) for w in weights) - lazy - copies
    # and the bf16 copies that batched decode steps on AVX512-BF16 read, 4x the packed bytes, within their budget
    widened = [w for w in int4 if "wide_panels" in getattr(w, "__dict__", {})]
    wide_copies = sum(w.wide_panels.nbytes for w in widened)
    assert wide_copies <= wide_weights_budget()
    assert all(w.wide_panels.nbytes == 4 * w.packed.numel() for w in widened)
    gemv_copies = copies - wide_copies
    file_size = smollm2_gguf.stat().st_size
    log.warning("resident weights %.1f MB (+ %.1f MB of head, %.1f MB of scale-zero and %.1f MB of bf16 copies "
                "built on use) for a %.1f MB file (%.2fx)", resident / 1e6, lazy / 1e6, gemv_copies / 1e6,
                wide_copies / 1e6, file_size / 1e6, resident / file_size)
    assert resident <= 1.3 * file_size
    assert gemv_copies <= sum(w.scale_zeros.numel() * w.scale_zeros.element_size() for w in int4 if
                              hasattr(w, "scale_zeros"))
    if head is not None:  # the greedy byte or bf16 panels and the sampled steps' int8 panels
        assert lazy <= 3.2 * head.qw.numel()
