"""The step loop: schedule -> run the model -> sample -> detokenize -> emit outputs.

Owns no device code: the backend, model and runner do the tensor work. Not thread-safe; ``AsyncLLM``
drives it from one thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from edgellm.backends import get_backend
from edgellm.config import EngineConfig
from edgellm.detokenizer import IncrementalDetokenizer
from edgellm.kv_cache import BlockManager
from edgellm.model_runner import ModelRunner, StepLogits
from edgellm.models import MODEL_REGISTRY
from edgellm.ngram_proposer import NgramProposer
from edgellm.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob, Usage
from edgellm.quant.kv_int8 import row_bytes
from edgellm.sampler import SampledToken, Sampler, SamplingRow
from edgellm.sampling_params import SamplingParams
from edgellm.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from edgellm.sequence import Request, Sequence

logger = logging.getLogger(__name__)

# 1 GiB of float32 K/V holds ~23k tokens of a 135M model: 32 concurrent chats with room for the prefix
# cache, without claiming the memory of an edge box. Raise it with kv_cache_memory.
DEFAULT_CPU_KV_BYTES = 1 << 30


class PromptTooLongError(ValueError):
    """The prompt does not fit the context; the message carries both numbers."""

    def __init__(self, num_tokens: int, max_model_len: int) -> None:
        self.num_tokens, self.max_model_len = num_tokens, max_model_len
        super().__init__(
            f"prompt is {num_tokens} tokens long, but this model's context is {max_model_len} tokens "
            f"(and at least one token must be left to generate)"
        )


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_draft_tokens: int = 0  # speculative tokens verified
    spec_accepted_tokens: int = 0  # of which the model agreed with


class LLMEngine:
    """One model on one backend, serving many requests at once by continuous batching."""

    def __init__(self, config: EngineConfig, loaded=None) -> None:
        from edgellm.catalog import resolve_model
        from edgellm.loader import load_model

        self.config = config
        if config.kv_page_in not in ("lazy", "idle"):
            raise ValueError(f"kv_page_in must be 'lazy' or 'idle', not {config.kv_page_in!r}")
        if config.num_speculative_tokens:  # bad settings fail before the model loads
            NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        if config.speculative_max_seqs is not None and config.speculative_max_seqs < 1:
            raise ValueError(f"speculative_max_seqs must be at least 1, got {config.speculative_max_seqs}")
        t0 = time.perf_counter()
        if loaded is None:
            loaded = load_model(str(resolve_model(config.model)), dequantize=config.weights == "dequantize")
        self.model_name = loaded.name
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.backend = get_backend(config.device, config.threads, config.batch_invariant, config.warmup)
        self.dtype = self.backend.resolve_dtype(config.dtype)
        torch.manual_seed(config.seed)
        self.model = MODEL_REGISTRY[mc.architecture](mc, self.backend, self.dtype)
        self.model.load_weights(dict(loaded.weights))
        loaded.weights.clear()
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.vocab_size = mc.vocab_size

        bs = config.block_size
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        kv_dtype = self._kv_dtype()
        bytes_per_block = 2 * mc.num_layers * mc.num_kv_heads * row_bytes(mc.head_dim, kv_dtype) * bs
        num_blocks = self._kv_budget() // bytes_per_block
        useful = config.max_num_seqs * -(-self.max_model_len // bs)
        num_blocks = int(min(num_blocks, useful))
        if num_blocks * bs < self.max_model_len:
            logger.warning("KV cache holds %d tokens; limiting max_model_len from %d", num_blocks * bs,
                           self.max_model_len)
            self.max_model_len = num_blocks * bs
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for even one KV block")
        self.kv_caches = self.backend.allocate_kv_cache(mc.num_layers, num_blocks, bs, mc.num_kv_heads,
                                                        mc.head_dim, kv_dtype)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens or self.backend.step_tokens(self.model, self.kv_caches)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget)
        self.runner = ModelRunner(self.model, self.backend, self.kv_caches, bs, self.vocab_size)
        self.backend.prepare_batching(self.model, self.kv_caches, config.max_num_seqs)
        self._idle_since: float | None = None
        self.sampler = Sampler(self.vocab_size, sorted(self.eos_token_ids))
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.proposer, self.spec_max_seqs = self._speculation()
        self.spec_draft_tokens = self.spec_accepted_tokens = 0
        logger.info("engine ready in %.2fs: %s on %s/%s, %d KV blocks of %d tokens (%.0f MiB)",
                    time.perf_counter() - t0, self.model_name, self.backend.name, self.dtype, num_blocks,
                    bs, num_blocks * bytes_per_block / 2**20)

    def _speculation(self) -> tuple[NgramProposer | None, int]:
        """The draft proposer (None: no speculative decoding) and the most running sequences that draft."""
        config, caps = self.config, self.backend.capabilities()
        k = caps.speculative_tokens if config.num_speculative_tokens is None else config.num_speculative_tokens
        if k and self.backend.batch_invariant:
            if config.num_speculative_tokens:
                logger.warning("speculative decoding is off in batch-invariant mode: a request's tokens "
                               "must not depend on how many others run")
            k = 0
        limit = config.speculative_max_seqs or caps.speculative_max_seqs or config.max_num_seqs
        if not k:
            return None, limit
        return NgramProposer(k, config.prompt_lookup_min, config.prompt_lookup_max), limit

    def _kv_dtype(self) -> torch.dtype:
        if self.config.kv_cache_dtype == "int8":
            return torch.int8  # per-row scales (quant.kv_int8); every backend reads it
        if self.config.kv_cache_dtype not in (None, "auto"):
            return self.backend.resolve_dtype(self.config.kv_cache_dtype)
        return self.backend.kv_cache_dtype(self.model.kv_source_dtype)

    def _kv_budget(self) -> int:
        want = self.config.kv_cache_memory
        avail = self.backend.capabilities().kv_cache_bytes_available
        if want is None:
            return int(min(0.3 * avail, DEFAULT_CPU_KV_BYTES)) if self.backend.device.type == "cpu" else int(
                0.8 * avail)
        if isinstance(want, float) and want <= 1.0:
            return int(want * avail)
        return int(want)

    # -- requests ----------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     priority: int = 0, arrival_time: float | None = None) -> Request:
        """Validate and tokenize; raises ``ValueError`` (naming the problem) for bad input.

        Thread-safe: touches no engine state, so callers may run it outside the engine thread.
        """
        from edgellm.tokenizer import encode_prompt

        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt, str):
            text, ids = prompt, encode_prompt(self.tokenizer, prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)
        for tok in list(params.logit_bias or {}) + list(params.stop_token_ids):
            if not 0 <= int(tok) < self.vocab_size:
                raise ValueError(f"token id {tok} in logit_bias/stop_token_ids is outside [0, {self.vocab_size})")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return Request(request_id, text, ids, params,
                       RequestMetrics(arrival_time or time.time()), priority=priority, max_tokens=max_tokens)

    def add_request(self, request_id: str, prompt: str | list[int] | Request,
                    params: SamplingParams | None = None, priority: int = 0) -> Request:
        req = prompt if isinstance(prompt, Request) else self.make_request(request_id, prompt, params, priority)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        seq = self._new_seq(req, 0, list(req.prompt_token_ids))
        req.seqs.append(seq)
        self.requests[req.request_id] = req
        self.scheduler.add(seq)
        return req

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        p = req.params
        seq = Sequence(req, index, token_ids, len(req.prompt_token_ids))
        if p.seed is not None:
            seq.generator = torch.Generator().manual_seed(p.seed + index)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens,
                                                 p.stop, p.include_stop_str_in_output)
        if p.logprobs is not None:
            seq.logprobs = []
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                seq.delta_text, seq.delta_token_ids, seq.delta_logprobs = "", [], []
        req.forked = True
        req.metrics.finished_time = time.time()
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_idle_work(self) -> bool:
        """Whether ``idle_work`` has something to do (with ``kv_page_in="idle"``)."""
        return self.config.kv_page_in == "idle" and not self.runner.fully_resident

    def idle_work(self) -> bool:
        """One short piece of work for an engine with no requests: page in the next blocks of the KV
        pool. Returns whether more is left; a caller runs it between checks for new requests."""
        if not self.has_idle_work():
            return False
        if self._idle_since is None:
            self._idle_since = time.perf_counter()
        more = self.runner.page_in_idle()
        if not more:
            logger.info("KV cache resident (%.0f MiB), %.1fs after idle page-in began",
                        sum(c.nbytes for c in self.kv_caches) / 2**20, time.perf_counter() - self._idle_since)
        return more

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.time()
        for s in sched.scheduled:
            m = s.seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        self.runner.ensure_resident(self.block_manager.high_water)
        head = self.runner.execute(sched)
        verified, rows = self._verify(sched, head)
        self.scheduler.update_after_step(sched, {i: len(t) - 1 for i, t in verified.items()})
        touched = self._sample_and_append(sched, head, verified, rows)
        outputs = []
        for req in touched:
            if req.finished:
                req.metrics.finished_time = time.time()
                self.requests.pop(req.request_id, None)
            outputs.append(self._output(req))
            for s in req.seqs:  # reported: a finished or waiting sample must not repeat its last delta
                s.delta_text, s.delta_token_ids, s.delta_logprobs = "", [], []
        return outputs

    def _propose(self) -> None:
        """Draft tokens for each decoding sequence whose next tokens are plain argmaxes (greedy, and
        nothing asked of its logits), within what it may still generate, while few enough run."""
        drafting = len(self.scheduler.running) <= self.spec_max_seqs
        for seq in self.scheduler.running:
            seq.spec_token_ids = []
            if not drafting:
                continue
            req, p = seq.request, seq.request.params
            if seq.num_computed_tokens != seq.num_tokens - 1 or not p.argmax_only or (
                    seq.num_output_tokens < p.min_tokens):
                continue
            limit = min(req.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
            if limit > 0:
                seq.spec_token_ids = self.proposer.propose(seq, limit)

    def _verify(self, sched: SchedulerOutput, head: StepLogits
                ) -> tuple[dict[int, list[int]], list[tuple[ScheduledSeq, int]]]:
        """Check each sequence's drafts against the model's argmax at each of its rows: it takes the
        argmaxes up to and including the first that differs from its draft (all of them, the last
        one past the drafts, when every draft held). Returns those tokens by sequence id, and every
        other sampling sequence with its head row, in schedule order."""
        verified: dict[int, list[int]] = {}
        rows: list[tuple[ScheduledSeq, int]] = []
        r = 0
        for s in sched.scheduled:
            if not s.samples:
                continue
            if not s.drafts:
                rows.append((s, r))
                r += 1
                continue
            n = len(s.drafts) + 1
            if head.greedy is not None:
                best = head.greedy[r:r + n].tolist()
            else:
                best = head.logits[r:r + n, :self.vocab_size].argmax(dim=-1).tolist()
            a = 0
            while a < n - 1 and s.drafts[a] == best[a]:
                a += 1
            verified[s.seq.seq_id] = best[:a + 1]
            self.spec_draft_tokens += n - 1
            self.spec_accepted_tokens += a
            r += n
        return verified, rows

    def _sample_and_append(self, sched: SchedulerOutput, head: StepLogits, verified: dict[int, list[int]],
                           rows: list[tuple[ScheduledSeq, int]]) -> list[Request]:
        seqs, row_logits = [], []
        touched: dict[str, Request] = {}
        now = time.time()
        for s, i in rows:
            seq, req = s.seq, s.seq.request
            targets = [seq]
            if req.params.n > 1 and not req.forked:
                targets += self._fork(seq)
            for t in targets:
                seqs.append(t)
                row_logits.append(i)
        for s in sched.scheduled:
            for token in verified.get(s.seq.seq_id, ()) if s.drafts else ():
                self._append(s.seq, SampledToken(token), now)
                touched[s.seq.request.request_id] = s.seq.request
                if s.seq.is_finished:  # a stop token or string, or the length: the rest is dropped
                    break
        if seqs:
            out = head.greedy if head.greedy is not None else head.logits
            if row_logits != list(range(out.shape[0])):  # n > 1 forks, or rows that verified drafts
                out = out[torch.tensor(row_logits)]
            if head.greedy is not None:  # the head took every row's argmax already
                tokens = [SampledToken(t) for t in out.tolist()]
            else:
                tokens = self.sampler(out, [SamplingRow(t.request.params, t.request.prompt_token_ids,
                                                        t.output_token_ids, t.generator) for t in seqs])
            for seq, tok in zip(seqs, tokens):
                self._append(seq, tok, now)
                touched[seq.request.request_id] = seq.request
        return list(touched.values())

    def _fork(self, parent: Sequence) -> list[Sequence]:
        req = parent.request
        req.forked = True
        children = []
        for i in range(1, req.params.n):
            child = self._new_seq(req, i, list(parent.token_ids))
            child.num_cached_tokens = parent.num_cached_tokens
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            req.seqs.append(child)
            children.append(child)
        return children

    def _append(self, seq: Sequence, tok: SampledToken, now: float) -> None:
        req, p = seq.request, seq.request.params
        token = tok.token_id
        seq.token_ids.append(token)
        seq.delta_token_ids.append(token)
        self.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
                self.prompt_tokens_total += len(req.prompt_token_ids)
        seq.last_token_time = req.metrics.last_token_time = now
        if seq.logprobs is not None and tok.logprob is not None:
            text = seq.detokenizer.token_text
            lp = TokenLogprob(token, text(token), tok.logprob, [(t, text(t), v) for t, v in tok.top])
            seq.logprobs.append(lp)
            seq.delta_logprobs.append(lp)

        n_out = seq.num_output_tokens
        reason, stop_reason = None, None
        is_stop_token = n_out > p.min_tokens - 1 and (
            (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids)
        if is_stop_token:
            reason, stop_reason = "stop", (token if token in p.stop_token_ids else None)
        else:
            delta, stop_str = seq.detokenizer.add_tokens([token])
            seq.delta_text += delta
            if stop_str is not None:
                reason, stop_reason = "stop", stop_str
        if reason is None and (n_out >= req.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if stop_reason is None or isinstance(stop_reason, int):
                seq.delta_text += seq.detokenizer.flush()
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)
        seq.text = seq.detokenizer.output_text

    def _output(self, req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index, text=s.detokenizer.output_text, token_ids=s.output_token_ids,
                delta_text=s.delta_text, delta_token_ids=list(s.delta_token_ids),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason, logprobs=s.logprobs,
                delta_logprobs=list(s.delta_logprobs) if s.logprobs is not None else None,
                first_token_time=s.first_token_time, last_token_time=s.last_token_time,
            )
            for s in sorted(req.seqs, key=lambda s: s.index)
        ]
        usage = Usage(len(req.prompt_token_ids), sum(s.num_output_tokens for s in req.seqs),
                      req.num_cached_tokens)
        metrics = replace(req.metrics, num_output_tokens=max((s.num_output_tokens for s in req.seqs), default=0))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, usage, metrics)

    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        return EngineStats(
            num_running=len(sch.running), num_waiting=len(sch.waiting), kv_cache_usage=bm.usage,
            num_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            num_preemptions=sch.num_preemptions, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            spec_draft_tokens=self.spec_draft_tokens, spec_accepted_tokens=self.spec_accepted_tokens,
        )
