"""A sequence: one completion being generated, as the scheduler sees it.

A request with n > 1 becomes n sequences that share the prompt's KV blocks (see Scheduler: the first one is
prefilled, the others are forked from it when its prompt is complete).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token or a stop string
    LENGTH = "length"      # max_tokens or max_model_len
    ABORT = "abort"        # the client went away or asked


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
