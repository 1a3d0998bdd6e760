"""Helpers that look inside an engine: teacher-forced logits and a plain greedy HF reference."""
from __future__ import annotations

import torch

from edgellm.benchmark_hf import hf_step
from edgellm.engine import LLMEngine
from edgellm.scheduler import ScheduledSeq, SchedulerOutput
from edgellm.sequence import Sequence


def full_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``token_ids`` (one prefill through the paged cache)."""
    req = engine.make_request("teacher-forced", token_ids)
    seq = Sequence(req, 0, list(token_ids), len(token_ids))
    assert engine.block_manager.allocate_slots(seq, len(token_ids)) is not None
    try:
        sched = SchedulerOutput([ScheduledSeq(seq, len(token_ids), True)])
        inp = engine.runner.prepare(sched)
        hidden = engine.model.forward(inp.input_ids, inp.positions, engine.kv_caches, inp.meta)
        return engine.model.compute_logits(hidden).float()
    finally:
        engine.block_manager.free_seq(seq)


def forced_decode_logits(engine: LLMEngine, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """The logits that predict each of ``forced``: the prompt's last position (one prefill), then one
    decode step per forced token, as generation runs them (the decode kernels, not the prompt ones)."""
    req = engine.make_request("forced-decode", prompt)
    seq = Sequence(req, 0, list(prompt), len(prompt))
    assert engine.block_manager.allocate_slots(seq, len(prompt) + len(forced)) is not None
    rows = []
    try:
        step = len(prompt)
        for tok in [None, *forced[:-1]]:
            if tok is not None:
                seq.token_ids.append(tok)
            inp = engine.runner.prepare(SchedulerOutput([ScheduledSeq(seq, step, True)]))
            hidden = engine.model.forward(inp.input_ids, inp.positions, engine.kv_caches, inp.meta)
            rows.append(engine.model.compute_logits(hidden[-1:]).float()[0])
            seq.num_computed_tokens += step
            step = 1
        return torch.stack(rows)
    finally:
        engine.block_manager.free_seq(seq)


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' model and KV cache, never stopping early."""
    ids = torch.tensor([prompt_ids])
    logits, past = hf_step(model, ids)
    generated = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        generated.append(nxt)
        logits, past = hf_step(model, torch.tensor([[nxt]]), past)
    return generated
