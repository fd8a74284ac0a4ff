"""Block manager tests: deterministic cases, and a stateful property test that drives the pool the way the
scheduler does (admit with prefix hits, grow, fork, free, re-admit) while a model of the KV contents checks that
every block a sequence reads holds exactly that sequence's tokens."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine.block_manager import BlockManager, chain_hash
from engine.sequence import Sequence
from schemas.sampling_params import SamplingParams

PARAMS = SamplingParams()


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", index=0, token_ids=list(tokens),
                    num_prompt_tokens=len(tokens), params=PARAMS, seed=seq_id, arrival=seq_id)


def prefix_keys(tokens: list[int]) -> list[int]:
    """keys[p] identifies the KV of position p, which depends on every token up to p (as a real model's does)."""
    keys, k = [], 0
    for t in tokens:
        k = hash((k, t))
        keys.append(k)
    return keys


def block_chain(tokens: list[int], block_size: int, num_full: int) -> list[int]:
    hashes, parent = [], None
    for i in range(num_full):
        parent = chain_hash(parent, tuple(tokens[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)
    return hashes


def commit(bm: BlockManager, seq: Sequence, num_new: int) -> None:
    """What the scheduler does once a step's tokens are planned."""
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq, seq.num_computed_tokens)


def check_pool(bm: BlockManager, holders: list[Sequence]) -> None:
    """The structural invariants of the pool, given every sequence that holds blocks."""
    counts = [0] * bm.num_blocks
    for seq in holders:
        assert len(set(seq.block_ids)) == len(seq.block_ids), f"seq {seq.seq_id} lists a block twice"
        for b in seq.block_ids:
            counts[b] += 1
    assert bm.ref_counts == counts, "ref counts differ from the number of holders"
    for b in range(bm.num_blocks):
        assert (b in bm.free_queue) == (counts[b] == 0), f"block {b}: in free queue iff unreferenced"
    assert len(bm.free_queue) + sum(1 for c in counts if c) == bm.num_blocks
    for h, b in bm.cached.items():
        assert bm.block_hash[b] == h, "cached entry points at a block with another hash"
    for b, h in enumerate(bm.block_hash):
        if h is not None:
            assert bm.cached.get(h) == b, f"block {b} has a hash but the cache does not find it"
    assert not bm.pending_copies
    stats = bm.stats()
    assert stats.num_used_blocks == sum(1 for c in counts if c)
    assert stats.num_cached_free_blocks == sum(1 for b in bm.free_queue if bm.block_hash[b] is not None)


# ---- deterministic -------------------------------------------------------------------------------------------
def test_admit_allocates_exactly_and_free_returns_everything():
    bm = BlockManager(8, 4)
    seq = make_seq(0, list(range(10)))
    assert bm.admit(seq, [], 10)
    assert seq.block_ids == [0, 1, 2] and bm.num_free_blocks == 5
    commit(bm, seq, 10)
    assert seq.block_hashes == block_chain(seq.token_ids, 4, 2)
    assert bm.cached == {seq.block_hashes[0]: 0, seq.block_hashes[1]: 1}
    bm.free(seq)
    assert seq.block_ids == [] and bm.ref_counts == [0] * 8 and bm.num_free_blocks == 8
    # The unhashed tail block is reused first; cached blocks wait at the back, tail before head.
    assert list(bm.free_queue)[0] == 2
    assert list(bm.free_queue)[-2:] == [1, 0]


def test_admit_is_all_or_nothing():
    bm = BlockManager(3, 4)
    seq = make_seq(0, list(range(13)))
    assert not bm.admit(seq, [], 13)                    # needs 4 blocks
    assert seq.block_ids == [] and bm.num_free_blocks == 3 and bm.ref_counts == [0, 0, 0]
    assert bm.admit(seq, [], 12)
    assert bm.num_free_blocks == 0


def test_prefix_hit_never_includes_last_token_and_counts_revived_blocks():
    bm = BlockManager(6, 4)
    a = make_seq(0, list(range(8)))
    assert bm.admit(a, [], 8)
    commit(bm, a, 8)
    bm.free(a)
    # An identical 8-token prompt may reuse only the first block: the last token must be computed.
    b = make_seq(1, list(range(8)))
    hits = bm.find_cached_prefix(b)
    assert hits == [0]
    # A 9-token prompt sharing 8 tokens reuses both.
    c = make_seq(2, list(range(8)) + [99])
    assert bm.find_cached_prefix(c) == [0, 1]
    assert bm.admit(c, [0, 1], 1)
    assert c.block_ids[:2] == [0, 1] and c.num_computed_tokens == 8 and c.num_cached_tokens == 8
    assert bm.prefix_queries == 8 + 9 and bm.prefix_hits == 8
    assert bm.stats().prefix_hit_rate == pytest.approx(8 / 17)
    # A different first block misses entirely, even if later blocks match.
    d = make_seq(3, [50, 1, 2, 3] + list(range(4, 8)) + [7])
    assert bm.find_cached_prefix(d) == []


def test_admit_counts_cached_blocks_sitting_in_free_queue():
    bm = BlockManager(3, 4)
    a = make_seq(0, list(range(8)))
    assert bm.admit(a, [], 8)
    commit(bm, a, 8)
    bm.free(a)                               # both blocks cached, in the free queue
    b = make_seq(1, list(range(8)) + [1, 2, 3, 4, 5])   # 13 tokens: 2 hits + 2 new blocks = 4 > 3
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    assert not bm.admit(b, hits, 5)
    assert bm.num_free_blocks == 3 and bm.ref_counts == [0, 0, 0]
    assert bm.admit(b, hits, 4)              # 12 tokens: 2 hits + 1 new
    assert bm.num_free_blocks == 0


def test_fork_shares_and_copy_on_write_on_first_write_into_shared_partial_block():
    bm = BlockManager(8, 4)
    parent = make_seq(0, list(range(6)))
    assert bm.admit(parent, [], 6)
    commit(bm, parent, 6)
    child = make_seq(1, list(range(6)))
    child.num_computed_tokens = parent.num_computed_tokens
    bm.fork(parent, child)
    assert child.block_ids == parent.block_ids == [0, 1]
    assert bm.ref_counts[:2] == [2, 2]
    parent.token_ids.append(7)
    child.token_ids.append(8)
    assert bm.blocks_needed(parent, 7) == 1
    changed = bm.allocate(parent, 1)
    assert changed == 1
    assert parent.block_ids == [0, 2]
    assert bm.take_pending_copies() == [(1, 2)]
    assert bm.ref_counts[:3] == [2, 1, 1]
    commit(bm, parent, 1)
    # The other holder is now alone in block 1 and writes in place.
    assert bm.blocks_needed(child, 7) == 0
    assert bm.allocate(child, 1) == 2
    assert child.block_ids == [0, 1] and bm.take_pending_copies() == []


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(8, 4)
    parent = make_seq(0, list(range(8)))
    assert bm.admit(parent, [], 8)
    commit(bm, parent, 8)
    child = make_seq(1, list(range(8)))
    child.num_computed_tokens = 8
    bm.fork(parent, child)
    parent.token_ids.append(1)
    assert bm.allocate(parent, 1) == 2
    assert parent.block_ids == [0, 1, 2] and bm.take_pending_copies() == []


def test_allocate_fails_without_side_effects():
    bm = BlockManager(2, 4)
    a = make_seq(0, list(range(6)))
    assert bm.admit(a, [], 6)
    commit(bm, a, 6)
    b = make_seq(1, list(range(6)))
    b.num_computed_tokens = 6
    bm.fork(a, b)
    a.token_ids.append(1)
    # Copy-on-write needs a block and there are none.
    assert bm.blocks_needed(a, 7) == 1 and bm.num_free_blocks == 0
    assert bm.allocate(a, 1) is None
    assert a.block_ids == [0, 1] and bm.ref_counts == [2, 2] and bm.pending_copies == []


def test_cached_free_block_is_evicted_when_handed_out_again():
    bm = BlockManager(2, 2)
    a = make_seq(0, [1, 2, 3])
    assert bm.admit(a, [], 3)
    commit(bm, a, 3)
    h = a.block_hashes[0]
    assert bm.cached == {h: 0}
    bm.free(a)
    b = make_seq(1, [9, 9, 9, 9])
    assert bm.find_cached_prefix(b) == []
    assert bm.admit(b, [], 4)                # needs both blocks: evicts the cached one
    assert bm.cached == {} and bm.block_hash[0] is None
    commit(bm, b, 4)
    assert set(bm.cached.values()) == {0, 1}


def test_prefix_caching_disabled_never_hits_or_hashes():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = make_seq(0, list(range(9)))
    assert bm.admit(a, [], 9)
    commit(bm, a, 9)
    assert a.block_hashes == [] and bm.cached == {}
    assert bm.find_cached_prefix(make_seq(1, list(range(9)))) == []


def test_stats_usage_and_cached_free():
    bm = BlockManager(10, 4)
    a = make_seq(0, list(range(9)))
    assert bm.admit(a, [], 9)
    commit(bm, a, 9)
    s = bm.stats()
    assert (s.num_used_blocks, s.num_cached_free_blocks, s.usage) == (3, 0, 0.3)
    bm.free(a)
    s = bm.stats()
    assert (s.num_used_blocks, s.num_cached_free_blocks, s.usage) == (0, 2, 0.0)
    assert s.prefix_queries == 9 and s.prefix_hits == 0 and s.prefix_hit_rate == 0.0


# ---- stateful --------------------------------------------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """Sequences are waiting (no blocks) or running (blocks for exactly their computed tokens). Every written
    slot of the fake KV pool holds the key of its sequence's prefix; a read must find the reader's own key."""

    @initialize(num_blocks=st.one_of(st.integers(2, 8), st.integers(2, 24)),
                block_size=st.sampled_from([1, 2, 4, 4]), caching=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def setup(self, num_blocks, block_size, caching, seed):
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.bs = block_size
        self.rng = random.Random(seed)
        self.stems = [[self.rng.randrange(4) for _ in range(24)] for _ in range(3)]
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.last_key_of_hash: dict[int, int] = {}     # block hash -> key of the block's last slot
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.next_id = 0
        self.queries = self.hits = 0

    # ---- helpers
    def _snapshot(self):
        bm = self.bm
        return (list(bm.ref_counts), list(bm.free_queue), dict(bm.cached), list(bm.block_hash),
                [(list(s.block_ids), list(s.block_hashes), s.num_computed_tokens) for s in self.running + self.waiting])

    def _write(self, seq: Sequence, start: int, end: int) -> None:
        keys = prefix_keys(seq.token_ids[:end])
        for p in range(start, end):
            block = seq.block_ids[p // self.bs]
            assert self.bm.ref_counts[block] == 1, f"write into block {block} that others hold"
            self.kv[block][p % self.bs] = keys[p]

    def _commit(self, seq: Sequence, num_new: int) -> None:
        before = set(self.bm.cached)
        self._write(seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new)
        commit(self.bm, seq, num_new)
        keys = prefix_keys(seq.token_ids)
        for i, h in enumerate(seq.block_hashes):
            if h not in before and h in self.bm.cached:
                self.last_key_of_hash.setdefault(h, keys[(i + 1) * self.bs - 1])

    def _pick(self, seqs: list[Sequence], pick: int) -> Sequence:
        return seqs[pick % len(seqs)]

    # ---- rules
    @rule(stem=st.integers(0, 2), keep=st.integers(0, 24), extra=st.lists(st.integers(0, 5), max_size=8))
    def new_sequence(self, stem, keep, extra):
        tokens = self.stems[stem][:keep] + extra
        if not tokens:
            tokens = [0]
        self.waiting.append(make_seq(self.next_id, tokens))
        self.next_id += 1

    @rule(pick=st.integers(0, 100), chunk=st.integers(1, 40))
    def admit(self, pick, chunk):
        if not self.waiting:
            return
        seq = self._pick(self.waiting, pick)
        hits = self.bm.find_cached_prefix(seq)
        assert len(hits) * self.bs <= seq.num_tokens - 1, "the last token came from the cache"
        assert len(set(hits)) == len(hits)
        keys = prefix_keys(seq.token_ids)
        for i, b in enumerate(hits):
            assert self.kv[b] == keys[i * self.bs:(i + 1) * self.bs], "a prefix hit holds someone else's KV"
        num_new = min(chunk, seq.num_tokens - len(hits) * self.bs)
        revived = sum(1 for b in hits if self.bm.ref_counts[b] == 0)
        fits = -(-(len(hits) * self.bs + num_new) // self.bs) - len(hits) + revived <= self.bm.num_free_blocks
        before = self._snapshot()
        ok = self.bm.admit(seq, hits, num_new)
        assert ok == fits
        if hits:
            event("prefix hit" + (" (revived)" if revived else ""))
        if not ok:
            event("admit refused")
            assert self._snapshot() == before
            return
        if seq.num_preemptions == 0:
            self.queries += seq.num_tokens
            self.hits += len(hits) * self.bs
        assert seq.block_ids[:len(hits)] == hits
        assert seq.num_computed_tokens == seq.num_cached_tokens == len(hits) * self.bs
        self.waiting.remove(seq)
        self.running.append(seq)
        self._commit(seq, num_new)

    @rule(pick=st.integers(0, 100), chunk=st.integers(1, 12))
    def grow(self, pick, chunk):
        if not self.running:
            return
        seq = self._pick(self.running, pick)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(self.rng.randrange(6))        # the token the last step sampled
        num_new = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        old_blocks = list(seq.block_ids)
        needed = self.bm.blocks_needed(seq, seq.num_computed_tokens + num_new)
        shared_last = bool(old_blocks) and self.bm.ref_counts[old_blocks[-1]] > 1 \
            and seq.num_computed_tokens % self.bs != 0
        before = self._snapshot()
        changed = self.bm.allocate(seq, num_new)
        if changed is None:
            event("allocate refused")
            assert needed > self.bm.num_free_blocks
            assert self._snapshot() == before
            return
        copies = self.bm.take_pending_copies()
        if shared_last:
            event("copy on write")
            assert changed == len(old_blocks) - 1
            assert copies == [(old_blocks[-1], seq.block_ids[changed])]
            src, dst = copies[0]
            assert self.bm.ref_counts[dst] == 1 and dst == seq.block_ids[changed]
            assert self.bm.ref_counts[src] >= 1
            self.kv[dst] = list(self.kv[src])
        else:
            assert changed == len(old_blocks) and copies == []
        assert seq.block_ids[:changed] == old_blocks[:changed]
        assert len(seq.block_ids) - len(old_blocks) + len(copies) == needed
        self._commit(seq, num_new)

    @rule(pick=st.integers(0, 100))
    def fork(self, pick):
        if not self.running:
            return
        parent = self._pick(self.running, pick)
        child = make_seq(self.next_id, parent.token_ids)
        self.next_id += 1
        child.num_computed_tokens = parent.num_computed_tokens
        self.bm.fork(parent, child)
        assert child.block_ids == parent.block_ids
        self.running.append(child)

    @rule(pick=st.integers(0, 100), requeue=st.booleans())
    def free(self, pick, requeue):
        if not self.running:
            return
        seq = self._pick(self.running, pick)
        blocks = list(seq.block_ids)
        self.bm.free(seq)
        assert seq.block_ids == [] and seq.block_hashes == []
        self.running.remove(seq)
        for b in blocks:
            if b not in (x for s in self.running for x in s.block_ids):
                assert b in self.bm.free_queue
        if requeue:                                       # preempted: recomputed from scratch later
            seq.num_computed_tokens = seq.num_cached_tokens = 0
            seq.num_preemptions += 1
            self.waiting.append(seq)

    # ---- invariants
    @invariant()
    def pool_is_consistent(self):
        check_pool(self.bm, self.running)
        for seq in self.waiting:
            assert seq.block_ids == [] and seq.num_computed_tokens == 0

    @invariant()
    def running_sequences_hold_exactly_their_blocks_and_kv(self):
        for seq in self.running:
            assert len(seq.block_ids) == -(-seq.num_computed_tokens // self.bs)
            full = seq.num_computed_tokens // self.bs
            if self.bm.enable_prefix_caching:
                assert seq.block_hashes == block_chain(seq.token_ids, self.bs, full)
            else:
                assert seq.block_hashes == []
            keys = prefix_keys(seq.token_ids)
            for p in range(seq.num_computed_tokens):
                assert self.kv[seq.block_ids[p // self.bs]][p % self.bs] == keys[p], \
                    f"seq {seq.seq_id} position {p} reads KV that is not its own"

    @invariant()
    def cached_blocks_hold_their_prefix(self):
        for h, b in self.bm.cached.items():
            assert self.kv[b][-1] == self.last_key_of_hash[h]

    @invariant()
    def prefix_stats(self):
        s = self.bm.stats()
        assert (s.prefix_queries, s.prefix_hits) == (self.queries, self.hits)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.running):
            self.bm.free(seq)
            self.running.remove(seq)
        check_pool(self.bm, [])
        assert self.bm.num_free_blocks == self.bm.num_blocks and all(c == 0 for c in self.bm.ref_counts)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase
