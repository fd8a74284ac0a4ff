"""What callers get back: one RequestOutput per request and step, with one CompletionOutput per sequence.

Fields are cumulative (text and token ids so far); `delta_text` and `delta_token_ids` hold what this output adds,
for streaming.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.plan import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None      # aligned with token_ids when logprobs were asked
    cumulative_logprob: float | None = None          # sum of its tokens' logprobs (logprobs, best_of, beams)
    finish_reason: str | None = None                 # "stop", "length", "abort" once finished
    stop_reason: int | str | None = None             # the stop token id or stop string that hit
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    # time.monotonic() as each output token of the first completion (index 0) reached the host: inter-token
    # latencies for the offline benchmark
    token_times: list[float] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                       # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    # With prompt_logprobs: aligned with prompt_token_ids, None for the first token (nothing predicts it)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    kv_blocks_saved: int = 0                         # beam search: the most KV blocks its beams shared at once


@dataclass
class BeamSearchSequence:
    """One beam, as vLLM's: tokens are the prompt's and the generated ones; text is the generated text."""
    tokens: list[int]
    text: str
    cum_logprob: float
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """LLM.beam_search's answer for one prompt: its beams, best first."""
    sequences: list[BeamSearchSequence]
    kv_blocks_saved: int = 0                         # the most KV blocks the beams shared at once

    @classmethod
    def of(cls, out: RequestOutput) -> BeamSearchOutput:
        """A finished beam search request's output (its completions are the beams, best first) in this shape."""
        return cls([BeamSearchSequence(out.prompt_token_ids + c.token_ids, c.text, c.cumulative_logprob,
                                       c.finish_reason, c.stop_reason) for c in out.outputs], out.kv_blocks_saved)
