"""The parts of a plan that travel to the worker as they are: a new sequence in full, a running one's delta, a fork.

engine.plan.Plan gathers them into one step for the engine; schemas.messages.PlanMessage carries them between the
scheduler and the worker services. They are here, beside the other wire types, so that the schemas depend on
nothing of the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class RunningSequence:
    seq_id: int
    block_offset: int                  # the block table from this index on is replaced by new_block_ids
    new_block_ids: list[int]           # (the offset is the old length, or one less after a copy on write)


@dataclass
class Fork:
    """After this step's forward, `child_id` becomes a copy of `parent_id` (tokens and blocks) and samples its
    own first token from the parent's logits with its own seed."""
    parent_id: int
    child_id: int
    seed: int
