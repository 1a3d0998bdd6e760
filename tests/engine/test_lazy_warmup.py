"""``warmup=False``: kernels load at their first use, and the tokens are the warmed-up engine's."""
from __future__ import annotations

from edgellm import LLM, SamplingParams
from edgellm.backends.cpu import CPUBackend


def test_lazy_engine_skips_the_warmup_and_generates_the_same_tokens(smollm2_gguf, q4_llm, monkeypatch):
    calls = []
    monkeypatch.setattr(CPUBackend, "warmup", lambda self: calls.append(self) or 0.0)
    lazy = LLM(str(smollm2_gguf), device="cpu", warmup=False, max_num_seqs=2)
    assert calls == []
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    assert [o.token_ids for o in lazy.generate(prompts, params)] == \
        [o.token_ids for o in q4_llm.generate(prompts, params)]
    LLM(str(smollm2_gguf), device="cpu", max_num_seqs=1)
    assert len(calls) == 1  # the default still warms up
