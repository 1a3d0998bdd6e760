"""The KV block pool: block tables, reference counts, prefix reuse and copy-on-write.

Pure bookkeeping over block ids; the tensors live in the model runner. A block that fills up with
computed tokens gets a chained hash of its tokens (and of everything before it) and becomes
immutable, so later requests with the same prefix can share it. Blocks whose reference count falls to
zero stay in an LRU, still findable by hash, until a new allocation needs them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from edgellm.sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] | None = None  # kept to rule out hash collisions


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # every block below this id has been handed out at least once; fresh blocks go in id order
        self.high_water = 0
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached

    # -- questions ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation --------------------------------------------------------------------------
    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.tokens = None
        block.ref_count = 1
        self.high_water = max(self.high_water, block_id + 1)
        return block

    def _hashes(self, seq: Sequence, num_full: int) -> list[int]:
        """Chained hashes of the first ``num_full`` full blocks of ``seq`` (memoized on the seq)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else None, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes[:num_full]

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the longest cached prefix of its tokens; return its length.

        At least one token is always left to compute, since its logits are needed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hits: list[int] = []
        for i, h in enumerate(self._hashes(seq, max_blocks)):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * bs
        return seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Make room for ``num_new_tokens`` more computed tokens.

        Returns the (src, dst) block copies that copy-on-write needs, or ``None`` (and changes nothing)
        when the pool has too few free blocks.
        """
        total = seq.num_computed_tokens + num_new_tokens
        need = self.blocks_needed(total) - len(seq.block_table)
        # the block the next token goes to, when it already holds some (tables may run past it: slots
        # of rejected drafts stay allocated for the tokens that come next)
        cur = seq.num_computed_tokens // self.block_size
        partial = seq.num_computed_tokens % self.block_size
        cow = partial != 0 and self.blocks[seq.block_table[cur]].ref_count > 1
        if max(need, 0) + cow > len(self.free):
            return None
        copies = []
        if cow:
            old = self.blocks[seq.block_table[cur]]
            new = self._take_free()
            old.ref_count -= 1
            seq.block_table[cur] = new.block_id
            copies.append((old.block_id, new.block_id))
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)
        return copies

    def register_computed(self, seq: Sequence) -> None:
        """Hash blocks that became full of computed tokens so later requests can reuse them.

        Each full block is looked at once (a decode step fills one block in 16, and rescanning a
        sequence's earlier blocks every step cost ~7 us a sequence)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # accepted drafts count as computed before the engine appends them as tokens
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            h, block = hashes[i], self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            if h in self.cached:
                continue  # an identical block is already cached; this copy frees normally
            block.hash, block.tokens = h, tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.cached[h] = block.block_id
        seq.num_registered_blocks = num_full

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent; writes to a shared block copy it first."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks
        child.num_computed_tokens = parent.num_computed_tokens
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks; hashed ones stay reusable, tail blocks are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # worthless: reuse first
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
