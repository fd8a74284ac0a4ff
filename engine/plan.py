"""The contract between the scheduler and the worker: a Plan per step, a StepResult back.

A sequence the worker has not seen is sent in full once (NewSequence); after that only deltas travel
(RunningSequence: its new blocks). The worker keeps each sequence's tokens itself, appending what it samples, so
a decode step's plan is a few integers per sequence. In-process the engine hands these objects over directly; the
services send them as msgpack (schemas/, where the parts that travel as they are, NewSequence, RunningSequence and
Fork, are defined).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.plan import BeamStep, Fork, NewSequence, RunningSequence


@dataclass
class Plan:
    """One step, or num_steps: step 1 computes num_scheduled_tokens[s] tokens of s as far as its known tokens
    go (a prompt chunk, or its last sampled token); each later step computes the token s sampled in the step
    before, until s has computed all its scheduled tokens. So a decoding s with n scheduled tokens samples n."""
    num_steps: int = 1
    new: list[NewSequence] = field(default_factory=list)
    running: list[RunningSequence] = field(default_factory=list)
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)   # seq id -> tokens computed this step
    forks: list[Fork] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # (src, dst), before the forward
    freed_seq_ids: list[int] = field(default_factory=list)   # finished or preempted: the worker drops them first,
    # after the beams chosen since the last plan (a new beam copies its parent, which this plan may free).
    beam_steps: list[BeamStep] = field(default_factory=list)
    # The scheduler's own record, never sent: how many tokens each sequence samples if every step runs. A plan
    # cut short after j steps (the worker stops at a step boundary when new prompts wait) samples min(n, j).
    samples: dict[int, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class TokenLogprobs:
    logprob: float                                   # of the sampled token (or of the prompt token)
    top: list[tuple[int, float]]                     # (token id, logprob), best first
    rank: int | None = None                          # prompt tokens: 1 + the tokens more likely than it


@dataclass
class StepResult:
    """What one step sampled: a token for every sequence whose prompt is complete, and for every fork child."""
    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None      # aligned with seq_ids when any sequence asked
    # With a sequence's first token, when its request asked for prompt_logprobs: the logprobs of its prompt's
    # tokens after the first (seq id -> one entry per token)
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
