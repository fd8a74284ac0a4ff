"""A sequence: one completion being generated, as the scheduler sees it.

A request with n > 1 becomes n sequences that share the prompt's KV blocks (see Scheduler: the first one is
prefilled, the others are forked from it when its prompt is complete).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from schemas.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token or a stop string
    LENGTH = "length"      # max_tokens or max_model_len
    ABORT = "abort"        # the client went away or asked


def check_stop(params: SamplingParams, token: int, num_output_tokens: int, num_tokens: int,
               eos_token_ids: frozenset[int], max_model_len: int) -> tuple[FinishReason, int | None] | None:
    """Whether the token just appended (the num_output_tokens-th) ends the sequence: (reason, stop token) or None.
    The scheduler and the worker both apply it, so they agree on where every sequence ends."""
    if num_output_tokens >= params.min_tokens:
        if token in eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP, None
        if token in params.stop_token_ids:
            return FinishReason.STOP, token
    if (params.max_tokens is not None and num_output_tokens >= params.max_tokens) or num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int                                  # which of the request's n completions
    token_ids: list[int]                        # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    seed: int                                   # the sampler's RNG stream for this sequence
    arrival: int                                # admission order; FCFS and preemption follow it
    priority: int = 0                           # lower is served first under the priority policy
    num_pending_forks: int = 0                  # siblings to fork when the prompt is complete
    num_inflight: int = 0                       # tokens sampled by scheduled steps whose results are not back yet
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0                # tokens whose KV is in the cache once scheduled steps ran
    num_cached_tokens: int = 0                  # of those, how many were prefix-cache hits at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of the full blocks so far
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None        # the stop token id or stop string that ended it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Service order: priority (always 0 under FCFS), then arrival; forked siblings follow their parent."""
        return (self.priority, self.arrival, self.seq_id)
