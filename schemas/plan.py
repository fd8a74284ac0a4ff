"""The parts of a plan that travel to the worker as they are: a new sequence in full, a running one's delta, a fork,
a beam's step.

engine.plan.Plan gathers them into one step for the engine; schemas.messages.PlanMessage carries them between the
scheduler and the worker services. They are here, beside the other wire types, so that the schemas depend on
nothing of the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from schemas.limits import MAX_SEQ_ID, Limits, check_ids, check_params, check_range, fail
from schemas.sampling_params import SamplingParams


@dataclass
class NewSequence:
    seq_id: int
    token_ids: list[int]               # everything so far: prompt, plus outputs if it was preempted
    num_prompt_tokens: int
    num_computed_tokens: int           # prefix-cache hits: KV already in the cache
    block_ids: list[int]
    params: SamplingParams
    seed: int
    beam: bool = False                 # a beam of a beam search: the scheduler chooses its tokens (BeamStep)

    def validate(self, path: str, limits: Limits) -> None:
        check_range(f"{path}.seq_id", self.seq_id, 0, MAX_SEQ_ID)
        check_range(f"{path}.token_ids length", len(self.token_ids), 1, limits.max_model_len)
        check_ids(f"{path}.token_ids", self.token_ids, limits.vocab_size)
        check_range(f"{path}.num_prompt_tokens", self.num_prompt_tokens, 1, len(self.token_ids))
        # At least the last token is computed in this plan: it is the one that samples.
        check_range(f"{path}.num_computed_tokens", self.num_computed_tokens, 0, len(self.token_ids) - 1)
        check_range(f"{path}.block_ids length", len(self.block_ids), 0, limits.max_blocks_per_seq)
        check_ids(f"{path}.block_ids", self.block_ids, limits.num_blocks)
        check_params(f"{path}.params", self.params, limits)
        check_range(f"{path}.seed", self.seed, -(1 << 63), (1 << 64) - 1)


@dataclass
class RunningSequence:
    seq_id: int
    block_offset: int                  # the block table from this index on is replaced by new_block_ids
    new_block_ids: list[int]           # (the offset is the old length, or one less after a copy on write)

    def validate(self, path: str, limits: Limits) -> None:
        check_range(f"{path}.seq_id", self.seq_id, 0, MAX_SEQ_ID)
        check_range(f"{path}.block_offset", self.block_offset, 0, limits.max_blocks_per_seq)
        check_range(f"{path}.blocks", self.block_offset + len(self.new_block_ids), 0, limits.max_blocks_per_seq)
        check_ids(f"{path}.new_block_ids", self.new_block_ids, limits.num_blocks)


@dataclass
class Fork:
    """After this step's forward, `child_id` becomes a copy of `parent_id` (tokens and blocks) and samples its
    own first token from the parent's logits with its own seed."""
    parent_id: int
    child_id: int
    seed: int

    def validate(self, path: str, limits: Limits) -> None:
        check_range(f"{path}.parent_id", self.parent_id, 0, MAX_SEQ_ID)
        check_range(f"{path}.child_id", self.child_id, 0, MAX_SEQ_ID)
        if self.child_id == self.parent_id:
            fail(path, f"a sequence cannot fork itself ({self.child_id})")
        check_range(f"{path}.seed", self.seed, -(1 << 63), (1 << 64) - 1)


@dataclass
class BeamStep:
    """A beam search chose `token_id` to continue `parent_id`: before this plan's steps, `seq_id` becomes the
    parent's computed tokens plus token_id (seq_id == parent_id: the parent itself goes on; else a new beam, which
    starts from the parent's block table, shared). A beam samples nothing of its own: it proposes candidates."""
    seq_id: int
    parent_id: int
    token_id: int

    def validate(self, path: str, limits: Limits) -> None:
        check_range(f"{path}.seq_id", self.seq_id, 0, MAX_SEQ_ID)
        check_range(f"{path}.parent_id", self.parent_id, 0, MAX_SEQ_ID)
        check_range(f"{path}.token_id", self.token_id, 0, limits.vocab_size - 1)
