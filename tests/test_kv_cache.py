from edgellm.kv_cache import BlockManager
from tests.fakes import make_seq


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(10)
    assert bm.allocate_cached_prefix(seq) == 0
    assert bm.allocate_slots(seq, 10) == []
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 1) == []  # fits in the third block
    assert len(seq.block_table) == 3
    bm.free_seq(seq)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(12)
    assert bm.allocate_slots(seq, 12) is None
    assert seq.block_table == [] and bm.num_free_blocks == 2


def _compute(bm, seq):
    bm.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)


def test_prefix_reuse_after_free_and_lru_eviction():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(list(range(100, 110)))  # 2 full blocks + 2 tokens
    _compute(bm, a)
    bm.free_seq(a)
    b = make_seq(list(range(100, 110)) + [7, 7])
    hit = bm.allocate_cached_prefix(b)
    assert hit == 8 and b.num_computed_tokens == 8
    bm.record_prefix_lookup(b.num_tokens, hit)
    assert bm.prefix_hits == 8
    # a prompt that is entirely cached still leaves its last token to compute
    c = make_seq(list(range(100, 108)))
    assert bm.allocate_cached_prefix(c) == 4


def test_hash_depends_on_everything_before_the_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(bm, a)
    b = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, different first
    assert bm.allocate_cached_prefix(b) == 0


def test_cached_blocks_are_evicted_only_when_needed():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(list(range(9)))
    _compute(bm, a)
    bm.free_seq(a)
    big = make_seq(list(range(50, 62)))  # needs all 3 blocks: evicts the cache
    assert bm.allocate_cached_prefix(big) == 0
    assert bm.allocate_slots(big, 12) == []
    bm.free_seq(big)
    again = make_seq(list(range(9)))
    assert bm.allocate_cached_prefix(again) == 0


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(6)
    _compute(bm, parent)
    child = make_seq(6)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    shared_last = parent.block_table[-1]
    copies = bm.allocate_slots(child, 1)  # child writes into the shared, partly full block
    assert copies == [(shared_last, child.block_table[-1])] and child.block_table[-1] != shared_last
    assert bm.blocks[shared_last].ref_count == 1
    assert bm.allocate_slots(parent, 1) == []  # parent now owns it alone: no copy
    assert child.block_table[0] == parent.block_table[0]  # full blocks stay shared
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free_blocks == 8


def test_high_water_marks_every_block_handed_out_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(10), make_seq(5)
    bm.allocate_slots(a, 10)
    bm.allocate_slots(b, 5)
    assert bm.high_water == 5 and sorted(a.block_table + b.block_table) == list(range(5))
    bm.free_seq(a)
    c = make_seq(20)
    bm.allocate_slots(c, 20)  # a's freed blocks (never cached) first, then fresh ones in id order
    assert bm.high_water == 7 and sorted(c.block_table) == [0, 1, 2, 5, 6]


def test_blocks_filled_one_token_at_a_time_are_registered_as_they_fill():
    """Decode steps add one computed token at a time; each block is hashed once it is full, and a
    preempted sequence's blocks are registered again when it is recomputed."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(1, 4)))
    _compute(bm, a)
    for t in range(4, 12):
        a.token_ids.append(t)
        _compute(bm, a)
        full = t // 4
        assert a.num_registered_blocks == full
        probe = make_seq(list(range(1, 13)))
        assert bm.allocate_cached_prefix(probe) == 4 * full
        bm.free_seq(probe)
    bm.free_seq(a)  # preempted: its blocks stay cached, and recomputing it starts the count again
    assert a.num_registered_blocks == 0
    assert bm.allocate_cached_prefix(a) == 8
    _compute(bm, a)
    assert a.num_registered_blocks == 2
