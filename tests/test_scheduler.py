import pytest

from edgellm.kv_cache import BlockManager
from edgellm.scheduler import Scheduler
from tests.fakes import make_seq


def run_step(sched: Scheduler):
    out = sched.schedule()
    sched.update_after_step(out)
    for s in out.scheduled:
        if s.samples:
            s.seq.token_ids.append(1)  # the "model" samples token 1
    return out


def test_token_budget_chunks_long_prompts_and_mixes_decodes():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=100)
    short = make_seq(10)
    long = make_seq(250)
    sched.add(short)
    sched.add(long)
    out = run_step(sched)
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(short, 10), (long, 90)]
    assert [s.samples for s in out.scheduled] == [True, False]
    out = run_step(sched)  # the short one decodes while the long one keeps prefilling
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(short, 1), (long, 99)]
    out = run_step(sched)
    assert [(s.seq, s.num_tokens, s.samples) for s in out.scheduled] == [(short, 1, True), (long, 61, True)]
    assert long.num_computed_tokens == 250 and long.num_output_tokens == 1


def test_max_num_seqs_limits_running():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [make_seq(5) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_priority_orders_admission():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=1, max_num_batched_tokens=1000)
    low, high = make_seq(5, priority=5), make_seq(5, priority=-1)
    sched.add(low)
    sched.add(high)
    out = run_step(sched)
    assert out.scheduled[0].seq is high


def test_preemption_by_recompute_loses_nothing():
    # 6 blocks of 4 tokens; three sequences that each grow to 12 tokens cannot all fit at once
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(6) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = 0
    for _ in range(200):
        if not sched.num_unfinished:
            break
        out = run_step(sched)
        preempted += len(out.preempted)
        for s in out.scheduled:
            if s.seq.num_output_tokens >= 6 and s.seq.num_computed_tokens == s.seq.num_tokens - 1:
                sched.finish(s.seq)
        assert bm.num_free_blocks + sum(len(s.block_table) for s in sched.running) >= bm.num_free_blocks
    assert sched.num_unfinished == 0
    assert preempted > 0
    assert all(s.num_output_tokens == 6 for s in seqs)
    assert bm.num_free_blocks == 6


def test_abort_frees_blocks_at_once():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = make_seq(10)
    sched.add(seq)
    run_step(sched)
    assert bm.num_free_blocks == 5
    sched.finish(seq)
    assert bm.num_free_blocks == 8 and not sched.running


def test_waiting_sequence_that_cannot_fit_waits_without_leaking():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq(12), make_seq(12)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [a]
    assert b.block_table == [] and b in sched.waiting
    assert bm.num_free_blocks == 1


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_every_token_is_computed_exactly_once(budget):
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
    seqs = [make_seq(n) for n in (3, 17, 30)]
    for s in seqs:
        sched.add(s)
    computed = {s.seq_id: 0 for s in seqs}
    while any(s.num_output_tokens == 0 for s in seqs):
        out = sched.schedule()
        assert out.num_tokens <= budget
        for s in out.scheduled:
            computed[s.seq.seq_id] += s.num_tokens
        sched.update_after_step(out)
        for s in out.scheduled:
            if s.samples:
                s.seq.token_ids.append(1)
                sched.finish(s.seq)
    # the 17- and 30-token prompts share their first 16 tokens: later ones reuse cached blocks
    assert computed == {s.seq_id: s.num_prompt_tokens - s.num_cached_tokens for s in seqs}
    assert sum(s.num_cached_tokens for s in seqs) > 0 or budget == 64


def test_the_step_budget_defaults_to_the_backends_choice(make_tiny_hf_model, monkeypatch):
    from edgellm.backends import cpu as cpu_backend
    from edgellm.llm import LLM

    folder = str(make_tiny_hf_model("llama"))
    monkeypatch.setenv("EDGELLM_AMX", "0")  # the budget of CPUs without AMX
    assert LLM(folder, device="cpu").engine.scheduler.max_num_batched_tokens == cpu_backend.CPU_STEP_TOKENS
    assert LLM(folder, device="cpu", max_num_batched_tokens=300).engine.scheduler.max_num_batched_tokens == 300
    assert LLM(folder, device="torch").engine.scheduler.max_num_batched_tokens == 2048


def test_drafts_ride_after_the_fed_token_and_only_accepted_ones_count_as_computed():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    seq = make_seq([1, 2, 3])
    sched.add(seq)
    run_step(sched)  # the prompt; the "model" samples 1
    seq.spec_token_ids = [5, 6, 7, 8, 9]
    out = sched.schedule()
    (s,) = out.scheduled
    assert (s.num_tokens, s.samples, s.drafts) == (6, True, [5, 6, 7, 8, 9])
    assert len(seq.block_table) == 3  # room for positions 3..8
    sched.update_after_step(out, {seq.seq_id: 1})  # the fed token and draft 5 held, then 42
    seq.token_ids += [5, 42]
    assert seq.num_computed_tokens == 5
    bm.register_computed(seq)
    # only the block of computed tokens is hashed; the one that held rejected drafts is not
    assert [bm.blocks[b].tokens for b in seq.block_table] == [(1, 2, 3, 1), None, None]
    seq.spec_token_ids = []
    out = sched.schedule()  # the slots past the accepted draft are written again, no new blocks
    assert out.scheduled[0].num_tokens == 1 and len(seq.block_table) == 3
    sched.update_after_step(out)
    seq.token_ids.append(43)
    seq.spec_token_ids = [44, 45]
    out = sched.schedule()
    sched.update_after_step(out, {seq.seq_id: 2})
    seq.token_ids += [44, 45, 46]
    bm.register_computed(seq)
    assert seq.num_computed_tokens == 9
    assert [bm.blocks[b].tokens for b in seq.block_table] == [(1, 2, 3, 1), (5, 42, 43, 44), None]


def test_drafts_take_only_the_budget_left_and_go_first_when_blocks_run_short():
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=4, max_num_batched_tokens=4)
    seq = make_seq([1, 2])
    sched.add(seq)
    run_step(sched)
    seq.spec_token_ids = [7, 7, 7, 7, 7]
    out = sched.schedule()
    assert out.scheduled[0].drafts == [7, 7, 7] and out.num_tokens == 4  # the budget
    sched.update_after_step(out, {seq.seq_id: 3})
    seq.token_ids += [7, 7, 7, 8]
    seq.spec_token_ids = [9, 9]
    out = sched.schedule()  # 7 tokens computed, 2 blocks of 4: room for the fed token only
    assert out.scheduled[0].drafts == [] and out.scheduled[0].num_tokens == 1 and not out.preempted


def test_a_sequence_still_in_its_prompt_gets_no_drafts():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=5)
    seq = make_seq(list(range(12)))
    sched.add(seq)
    seq.spec_token_ids = [1, 2]
    out = sched.schedule()
    assert out.scheduled[0].drafts == [] and out.scheduled[0].num_tokens == 5
