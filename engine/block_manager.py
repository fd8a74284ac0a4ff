"""The paged KV cache's bookkeeping: a fixed pool of blocks, reference counts, prefix caching, copy on write.

Every block is either referenced (ref_count > 0, owned by one or more sequences) or in the free queue. The free
queue is also the prefix cache's LRU: a full block whose owners are gone keeps its hash and stays findable until
it is handed out again. Blocks without a hash are queued at the front (reused first) and cached ones at the back,
so a cached prefix survives as long as there is other space.

Prefix caching keys each full block by a chained hash of (previous block's hash, the block's token ids), so a hit
on block i implies the whole prefix up to i matches.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from engine.sequence import Sequence


def chain_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints is deterministic across processes (PYTHONHASHSEED only salts str/bytes);
    # 64 bits make an accidental collision among millions of cached blocks vanishingly unlikely.
    return hash((parent_hash, tokens))


def full_block_hashes(token_ids: list[int], block_size: int) -> Iterator[int]:
    """The chained hashes of the full blocks of token_ids, in order, as the prefix cache keys them (lazily: a
    lookup that misses stops early)."""
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, tuple(token_ids[start:start + block_size]))
        yield parent


@dataclass
class KVCacheStats:
    num_blocks: int
    num_used_blocks: int          # referenced by at least one sequence
    num_cached_free_blocks: int   # unreferenced but holding a reusable prefix
    prefix_queries: int           # prompt tokens looked up in the prefix cache
    prefix_hits: int              # of those, tokens found

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                       # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []        # (src, dst) copy-on-write, taken by the scheduler
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` tokens fit (plus one if its last block must be copied)."""
        needed = max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))
        return needed + int(self._needs_copy(seq, num_tokens))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq's tokens. The last token is never taken from the cache:
        its logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in full_block_hashes(seq.token_ids[:-1], self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def stats(self) -> KVCacheStats:
        cached_free = sum(1 for b in self.free_queue if self.block_hash[b] is not None)
        return KVCacheStats(self.num_blocks, self.num_blocks - self.num_free_blocks, cached_free,
                            self.prefix_queries, self.prefix_hits)

    # ---- allocation ----------------------------------------------------------------------------------------
    def admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Give a waiting sequence its prefix-cache hits plus blocks for num_new_tokens more. All or nothing."""
        assert not seq.block_ids
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)   # hits now sitting in the free queue
        num_cached_tokens = len(cached_blocks) * self.block_size
        needed = -(-(num_cached_tokens + num_new_tokens) // self.block_size) - len(cached_blocks)
        if needed + revived > self.num_free_blocks:
            return False
        for block in cached_blocks:
            self._take(block)
        seq.block_ids = list(cached_blocks)
        seq.block_hashes = [self.block_hash[b] for b in cached_blocks]
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached_tokens
        if seq.num_preemptions == 0:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += num_cached_tokens
        self._grow(seq, num_cached_tokens + num_new_tokens)
        return True

    def allocate(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """Make room for num_new_tokens more tokens of a running sequence. Returns the index of the first block
        table entry that changed (new or copied), or None (changing nothing) when the pool is short."""
        target = seq.num_computed_tokens + num_new_tokens
        if self.blocks_needed(seq, target) > self.num_free_blocks:
            return None
        first_changed = len(seq.block_ids)
        if self._needs_copy(seq, target):
            self._copy_on_write(seq)
            first_changed -= 1
        self._grow(seq, target)
        return first_changed

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent; whichever writes first into a shared block copies it."""
        for block in parent.block_ids:
            self.ref_counts[block] += 1
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared by a future prompt, so they go out first.
        for block in reversed(seq.block_ids):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                self.free_queue.move_to_end(block, last=self.block_hash[block] is not None)
        seq.block_ids = []
        seq.block_hashes = []

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that the first num_tokens tokens of seq fill completely (their KV is being written
        by the step that computes them, before any later step can read it)."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), num_tokens // self.block_size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size]))
            seq.block_hashes.append(h)
            block = seq.block_ids[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix of the free blocks (blocks in use keep theirs): a benchmark that runs the
        same prompts again must not find them cached."""
        for block in self.free_queue:
            self._evict(block)
        self.prefix_queries = self.prefix_hits = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # ---- internals -----------------------------------------------------------------------------------------
    def _needs_copy(self, seq: Sequence, target_tokens: int) -> bool:
        """The next write lands in a partially filled last block that other sequences also hold."""
        if not seq.block_ids or seq.num_computed_tokens % self.block_size == 0:
            return False
        return target_tokens > seq.num_computed_tokens and self.ref_counts[seq.block_ids[-1]] > 1

    def _copy_on_write(self, seq: Sequence) -> None:
        src = seq.block_ids[-1]
        dst = self._pop_free()
        self.ref_counts[src] -= 1
        seq.block_ids[-1] = dst
        self.pending_copies.append((src, dst))

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_ids) * self.block_size < num_tokens:
            seq.block_ids.append(self._pop_free())

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        self._evict(block)
        self.ref_counts[block] = 1
        return block

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
