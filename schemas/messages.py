"""Every message between the services, one dataclass per stream hop.

    gateway --GenerateRequest--> [tokenize] --> tokenizer --ScheduleRequest--> [schedule] --> scheduler
    gateway, detokenizer --Abort--> [abort] --> scheduler
    gateway --Resume--> [resume] --> scheduler (a stream taken over by another gateway, see services/resumable.py)
    scheduler --PlanMessage--> [plan:<worker>] --> worker --StepEvent--> [events:<worker>] --> scheduler
    worker --StepTokens--> [tokens:<partition>] --> detokenizer --Reply--> [reply:<gateway>] --> gateway
    tokenizer --Reply (error)--> [reply:<gateway>]; tokenizer --RequestMeta--> key request:<id> (detokenizer)

Messages carry (request_id, seq) where a consumer must drop duplicates: a message can be delivered twice when a
consumer dies after its effect but before its acknowledgement. Encoding and checking: schemas.codec.

Every hop is timed: each service stamps (unix time, time.time()) when it takes a request or a token, and the
stamps travel on. A request's first token carries its whole journey, FIRST_TOKEN_STAMPS; every other token
carries the stamps of its delivery, DELIVERY_STAMPS. The gateway adds its own two and turns them into the hops
of /metrics: consecutive stamps bound one hop, so a request's hops add up to its time to first token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.codec import message
from schemas.limits import (FINISH_REASONS, MAX_COMPLETIONS, MAX_NUM_STEPS, MAX_SEQ_ID, Limits, check_aligned,
                            check_finite, check_ids, check_params, check_range, fail)
from schemas.beam_search_params import BeamSearchParams, check_beam_search
from schemas.plan import BeamStep, Fork, NewSequence, RunningSequence
from schemas.sampling_params import SamplingParams

MAX_PROMPT_TOKENS = 1 << 20

# The stamps of a request's first token, in order; the gateway appends the last two.
FIRST_TOKEN_STAMPS = ("arrival", "tokenizer_took", "scheduler_took", "admitted", "plan_started", "on_host",
                      "detokenizer_took", "gateway_took", "written")
# Every token's delivery: from the worker's host memory to the client.
DELIVERY_STAMPS = ("on_host", "detokenizer_took", "gateway_took", "written")
# A hop is named for the two stamps that bound it; these are its names in /metrics.
FIRST_TOKEN_HOPS = ("gateway_to_tokenizer", "tokenizer_to_scheduler", "admission_wait", "scheduler_to_worker",
                    "gpu_step", "worker_to_detokenizer", "detokenizer_to_gateway", "gateway_to_client")
DELIVERY_HOPS = FIRST_TOKEN_HOPS[-3:]


@dataclass
class ChatToolCall:
    """A call an assistant message made (a follow-up sends it back), rendered by the chat template."""
    id: str = field(metadata={"max_len": 256})
    name: str = field(metadata={"max_len": 256})
    arguments: str                                            # JSON text


@dataclass
class ChatMessage:
    role: str = field(metadata={"max_len": 64})
    content: str
    tool_calls: list[ChatToolCall] | None = None              # an assistant's calls
    tool_call_id: str | None = field(default=None, metadata={"max_len": 256})   # a tool message: the call it answers


@message("generate")
@dataclass
class GenerateRequest:
    """A request as the gateway took it: text or token ids, or a chat conversation, still to be tokenized."""
    request_id: str = field(metadata={"max_len": 256})
    gateway: str = field(metadata={"max_len": 256})          # its reply stream is reply:<gateway>
    params: SamplingParams
    arrival: float                                            # unix time the gateway accepted it
    prompt: str | None = None
    prompt_token_ids: list[int] | None = field(default=None, metadata={"max_len": MAX_PROMPT_TOKENS})
    messages: list[ChatMessage] | None = None
    tools: str | None = None       # chat: the functions offered, as the JSON text of OpenAI's tools list
    add_generation_prompt: bool = True
    priority: int = 0
    epoch: str = ""                # the scheduler epoch the gateway saw: a restarted scheduler drops older ones
    beam_search: BeamSearchParams | None = None      # use_beam_search: params.n of its beams are returned
    probe: bool = False            # a gateway's readiness probe (never a client's): admitted ahead of the queue

    def validate(self, limits: Limits) -> None:
        # Prompt token ids are the client's to get right: the input processor refuses them with a message for
        # the client. What is checked here is what no client of a well-behaved gateway can send.
        check_params("generate.params", self.params, limits, lengths=False)
        check_finite("generate", arrival=self.arrival)
        check_beam("generate", self.params, self.beam_search)


@message("schedule")
@dataclass
class ScheduleRequest:
    """A tokenized, validated request, ready for admission."""
    request_id: str = field(metadata={"max_len": 256})
    gateway: str = field(metadata={"max_len": 256})
    prompt_token_ids: list[int] = field(metadata={"max_len": MAX_PROMPT_TOKENS})
    params: SamplingParams
    arrival: float
    priority: int = 0
    epoch: str = ""
    tokenizer_took: float = 0.0                               # when a tokenizer took the GenerateRequest
    beam_search: BeamSearchParams | None = None
    probe: bool = False

    def validate(self, limits: Limits) -> None:
        # The prompt and the lengths asked for are the input processor's to check: the scheduler runs it again,
        # against its worker, and answers a stray request with the message clients know (one check, not two).
        check_params("schedule.params", self.params, limits, lengths=False)
        check_finite("schedule", arrival=self.arrival, tokenizer_took=self.tokenizer_took)
        check_beam("schedule", self.params, self.beam_search)


@message("request_meta")
@dataclass
class RequestMeta:
    """What the detokenizers need to know of a request, written once by the tokenizer (a Redis key, so any
    detokenizer replica that takes over a partition finds it)."""
    request_id: str = field(metadata={"max_len": 256})
    gateway: str = field(metadata={"max_len": 256})
    num_prompt_tokens: int
    prompt_tail: list[int]                                    # the last prompt tokens: decoding context
    params: SamplingParams

    def validate(self, limits: Limits) -> None:
        check_range("request_meta.num_prompt_tokens", self.num_prompt_tokens, 1, limits.max_model_len)
        check_ids("request_meta.prompt_tail", self.prompt_tail, limits.vocab_size)
        check_params("request_meta.params", self.params, limits)


@message("abort")
@dataclass
class Abort:
    """Finish a request (index None: all its sequences) or one sequence of it (a stop string hit)."""
    request_id: str = field(metadata={"max_len": 256})
    index: int | None = None
    reason: str = "abort"                                     # "abort" (client gone) or "stop" (stop string)
    stop_reason: str | None = None

    def validate(self, limits: Limits | None = None) -> None:
        if self.index is not None:
            check_range("abort.index", self.index, 0, MAX_COMPLETIONS - 1)
        if self.reason not in ("abort", "stop"):
            fail("abort.reason", f"must be 'abort' or 'stop', got {self.reason!r}")


@message("resume")
@dataclass
class Resume:
    """A gateway takes over a request another gateway (or an earlier connection to itself) was streaming: its
    client came back with Last-Event-ID. The scheduler makes this gateway the request's owner (the one whose death
    gets the request aborted after the grace period), tells the previous owner to let go, and answers with an
    error reply if the request is no longer in flight."""
    request_id: str = field(metadata={"max_len": 256})
    gateway: str = field(metadata={"max_len": 256})


@message("plan")
@dataclass
class PlanMessage:
    """engine.plan.Plan for one worker, plus what only the pipeline needs: who each new sequence belongs to."""
    plan_id: int
    worker_epoch: str              # a restarted worker skips plans made for its predecessor
    scheduler_epoch: str           # a new scheduler epoch: the worker drops every sequence it holds
    num_steps: int
    new: list[NewSequence]
    new_request_ids: list[str]                                # aligned with `new`
    new_indexes: list[int]
    running: list[RunningSequence]
    scheduled_seq_ids: list[int]
    scheduled_tokens: list[int]
    forks: list[Fork]
    fork_indexes: list[int]                                   # the child's completion index, aligned with forks
    block_copies: list[tuple[int, int]]
    freed_seq_ids: list[int]
    # Aligned with `new`: the request's stamps so far (arrival, tokenizer_took, scheduler_took, admitted), for
    # the first token's journey; empty for a sequence sent again after preemption.
    new_stamps: list[list[float]] = field(default_factory=list)
    beam_steps: list[BeamStep] = field(default_factory=list)  # applied first: see engine.plan.Plan

    def validate(self, limits: Limits) -> None:
        """What can be checked without the worker's state; the worker checks the rest (which sequences it
        holds, how far each has computed) before it runs the plan."""
        check_range("plan.plan_id", self.plan_id, 0, MAX_SEQ_ID)
        check_range("plan.num_steps", self.num_steps, 1, MAX_NUM_STEPS)
        check_aligned("plan", new=self.new, new_request_ids=self.new_request_ids, new_indexes=self.new_indexes,
                      **({"new_stamps": self.new_stamps} if self.new_stamps else {}))
        check_aligned("plan", scheduled_seq_ids=self.scheduled_seq_ids, scheduled_tokens=self.scheduled_tokens)
        check_aligned("plan", forks=self.forks, fork_indexes=self.fork_indexes)
        for i, seq in enumerate(self.new):
            seq.validate(f"plan.new[{i}]", limits)
        for i, run in enumerate(self.running):
            run.validate(f"plan.running[{i}]", limits)
        for i, fork in enumerate(self.forks):
            fork.validate(f"plan.forks[{i}]", limits)
        for i, step in enumerate(self.beam_steps):
            step.validate(f"plan.beam_steps[{i}]", limits)
        check_ids("plan.new_indexes", self.new_indexes, MAX_COMPLETIONS)
        check_ids("plan.fork_indexes", self.fork_indexes, MAX_COMPLETIONS)
        check_ids("plan.scheduled_seq_ids", self.scheduled_seq_ids, MAX_SEQ_ID)
        check_ids("plan.freed_seq_ids", self.freed_seq_ids, MAX_SEQ_ID)
        if self.scheduled_tokens:
            check_range("plan.scheduled_tokens", min(self.scheduled_tokens), 1, limits.max_model_len)
            check_range("plan.scheduled_tokens", max(self.scheduled_tokens), 1, limits.max_model_len)
        for name, ids in (("new", [n.seq_id for n in self.new]), ("scheduled_seq_ids", self.scheduled_seq_ids),
                          ("running", [r.seq_id for r in self.running]), ("forks", [f.child_id for f in self.forks]),
                          ("beam_steps", [b.seq_id for b in self.beam_steps])):
            if len(set(ids)) != len(ids):
                fail(f"plan.{name}", "a sequence appears twice")
        check_ids("plan.block_copies", [b for pair in self.block_copies for b in pair], limits.num_blocks)
        for i, stamps in enumerate(self.new_stamps):
            check_range(f"plan.new_stamps[{i}] length", len(stamps), 0, len(FIRST_TOKEN_STAMPS))
            check_finite(f"plan.new_stamps[{i}]", **{str(k): v for k, v in enumerate(stamps)})


@message("step_event")
@dataclass
class StepEvent:
    """Worker -> scheduler, once per plan: what every sequence sampled, and which ones finished on the worker."""
    plan_id: int
    seq_ids: list[int]
    token_ids: list[list[int]]                                # per sequence, one per step it sampled
    finish_reasons: list[str | None]                          # "stop" / "length" where the worker ended it
    stop_reasons: list[int | None]                            # the stop token id, where one ended it
    num_steps_run: int = 0         # fewer than the plan's num_steps: cut at a step boundary (Scheduler.cut)
    # Beams (one step a plan): each one's candidates, its top 2 x beam_width tokens (its token_ids mean nothing).
    beam_seq_ids: list[int] = field(default_factory=list)
    beam_candidates: list[TokenLogprobsWire] = field(default_factory=list)

    def validate(self, limits: Limits) -> None:
        check_range("step_event.plan_id", self.plan_id, 0, MAX_SEQ_ID)
        check_range("step_event.num_steps_run", self.num_steps_run, 0, MAX_NUM_STEPS)
        check_aligned("step_event", seq_ids=self.seq_ids, token_ids=self.token_ids,
                      finish_reasons=self.finish_reasons, stop_reasons=self.stop_reasons)
        check_ids("step_event.seq_ids", self.seq_ids, MAX_SEQ_ID)
        if len(set(self.seq_ids)) != len(self.seq_ids):
            fail("step_event.seq_ids", "a sequence appears twice")
        for i, tokens in enumerate(self.token_ids):
            # One token per step, and a sequence computes at most max_model_len tokens in one plan.
            check_range(f"step_event.token_ids[{i}] length", len(tokens), 0, limits.max_model_len)
            check_ids(f"step_event.token_ids[{i}]", tokens, limits.vocab_size)
        check_finish("step_event", self.finish_reasons, self.stop_reasons, limits)
        check_aligned("step_event", beam_seq_ids=self.beam_seq_ids, beam_candidates=self.beam_candidates)
        if not set(self.beam_seq_ids) <= set(self.seq_ids):
            fail("step_event.beam_seq_ids", "a beam that sampled nothing")
        for i, candidates in enumerate(self.beam_candidates):
            check_aligned(f"step_event.beam_candidates[{i}]", top_token_ids=candidates.top_token_ids,
                          top_logprobs=candidates.top_logprobs)
            check_ids(f"step_event.beam_candidates[{i}].top_token_ids", candidates.top_token_ids, limits.vocab_size)
            check_finite(f"step_event.beam_candidates[{i}]",
                         **{str(k): v for k, v in enumerate(candidates.top_logprobs)})


@message("worker_info")
@dataclass
class WorkerInfo:
    """What a worker registers at start (key worker:<name>): the scheduler sizes its block manager from it."""
    worker: str
    epoch: str
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str = "cpu"                       # "cuda" or "cpu": the scheduler's step budget defaults by it

    def validate(self, limits: Limits | None = None) -> None:
        """Its own consistency: every other message is checked against these numbers."""
        check_range("worker_info.num_blocks", self.num_blocks, 1, 1 << 40)
        check_range("worker_info.block_size", self.block_size, 1, 1 << 20)
        check_range("worker_info.max_model_len", self.max_model_len, 1, 1 << 40)
        check_range("worker_info.vocab_size", self.vocab_size, 1, 1 << 40)
        check_ids("worker_info.eos_token_ids", self.eos_token_ids, self.vocab_size)
        if self.device not in ("cpu", "cuda"):
            fail("worker_info.device", f"must be cpu or cuda, got {self.device!r}")


@dataclass
class TokenLogprobsWire:
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class PromptLogprobsWire:
    """A prompt's logprobs (prompt_logprobs, or echo with logprobs), sent with each completion's first token."""
    token_ids: list[int]                                      # the prompt
    logprobs: list[TokenLogprobsWire]                         # of token_ids[1:]: nothing predicts the first
    ranks: list[int]                                          # aligned with logprobs: 1 + the tokens likelier

    def validate(self, path: str, limits: Limits) -> None:
        check_range(f"{path}.token_ids length", len(self.token_ids), 1, limits.max_model_len)
        check_ids(f"{path}.token_ids", self.token_ids, limits.vocab_size)
        check_range(f"{path}.logprobs length", len(self.logprobs), len(self.token_ids) - 1, len(self.token_ids) - 1)
        check_aligned(path, logprobs=self.logprobs, ranks=self.ranks)
        check_ids(f"{path}.ranks", [r - 1 for r in self.ranks], limits.vocab_size)
        for i, lp in enumerate(self.logprobs):
            check_aligned(f"{path}.logprobs[{i}]", top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)
            check_ids(f"{path}.logprobs[{i}].top_token_ids", lp.top_token_ids, limits.vocab_size)


@message("step_tokens")
@dataclass
class StepTokens:
    """Worker -> detokenizers, one per step and partition, columnar: the k-th entry of each list is one token."""
    step: int
    request_ids: list[str]
    indexes: list[int]                                        # completion index within the request
    positions: list[int]                                      # the token's index in its completion: the dedup key
    token_ids: list[int]
    finish_reasons: list[str | None]
    stop_reasons: list[int | None]
    logprobs: list[TokenLogprobsWire] | None = None          # aligned, when any request of the step asked
    num_cached_tokens: list[int] = field(default_factory=list)   # the request's prompt tokens from the cache
    on_host: float = 0.0                                      # when the step's tokens reached the worker's host
    # Aligned (or empty: none of the step's tokens is a first): a request's first token carries its stamps
    # from arrival to plan_started.
    first_stamps: list[list[float]] = field(default_factory=list)
    # Aligned (or empty: no request of the step asked): a first token of a request that asked carries its
    # prompt's logprobs.
    prompt_logprobs: list[PromptLogprobsWire | None] = field(default_factory=list)

    def validate(self, limits: Limits) -> None:
        columns = dict(request_ids=self.request_ids, indexes=self.indexes, positions=self.positions,
                       token_ids=self.token_ids, finish_reasons=self.finish_reasons, stop_reasons=self.stop_reasons)
        for name in ("logprobs", "num_cached_tokens", "first_stamps", "prompt_logprobs"):
            if getattr(self, name):
                columns[name] = getattr(self, name)
        check_aligned("step_tokens", **columns)
        check_range("step_tokens.step", self.step, 0, MAX_SEQ_ID)
        check_ids("step_tokens.indexes", self.indexes, MAX_COMPLETIONS)
        check_ids("step_tokens.positions", self.positions, limits.max_model_len)
        check_ids("step_tokens.num_cached_tokens", self.num_cached_tokens, limits.max_model_len + 1)
        check_ids("step_tokens.token_ids", self.token_ids, limits.vocab_size)
        check_finish("step_tokens", self.finish_reasons, self.stop_reasons, limits)
        for i, lp in enumerate(self.logprobs or []):
            check_aligned(f"step_tokens.logprobs[{i}]", top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)
            check_ids(f"step_tokens.logprobs[{i}].top_token_ids", lp.top_token_ids, limits.vocab_size)
        for i, prompt in enumerate(self.prompt_logprobs):
            if prompt is not None:
                prompt.validate(f"step_tokens.prompt_logprobs[{i}]", limits)


@dataclass
class ErrorInfo:
    message: str
    type: str = "invalid_request_error"                       # OpenAI's error types
    code: int = 400                                           # the HTTP status the gateway answers with
    param: str | None = None


# The error a gateway gets for a request another gateway (or connection) took over: it lets go, and does not abort.
RESUMED_ELSEWHERE = "stream_resumed"


@dataclass
class ReplyItem:
    request_id: str = field(metadata={"max_len": 256})
    index: int = 0
    seq: int = 0                               # per (request, index): 0, 1, 2, ... the gateway drops repeats
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobsWire] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: ErrorInfo | None = None
    stamps: list[float] = field(default_factory=list)       # FIRST_TOKEN_STAMPS or DELIVERY_STAMPS so far
    prompt_logprobs: PromptLogprobsWire | None = None         # with the first item, where the request asked


@message("reply")
@dataclass
class Reply:
    """Detokenizer (or tokenizer, for errors) -> one gateway: deltas for many requests in one message."""
    items: list[ReplyItem]


@dataclass
class MetricSeries:
    name: str = field(metadata={"max_len": 128})
    labels: list[str] = field(metadata={"max_len": 8})      # label values, in the metric's label order
    values: list[float] = field(metadata={"max_len": 256})  # a counter's value; a histogram's bucket counts, sum


@message("gateway_stats")
@dataclass
class GatewayStats:
    """One gateway's own metrics (key stats:gateway:<id>), so that /metrics on any gateway of a deployment
    answers for all of them (several gateway processes share one port)."""
    gateway: str = field(metadata={"max_len": 256})
    series: list[MetricSeries] = field(metadata={"max_len": 1024})


def check_beam(path: str, params: SamplingParams, beam_search: BeamSearchParams | None) -> None:
    if beam_search is not None:
        try:
            check_beam_search(params, beam_search)
        except ValueError as e:
            fail(f"{path}.beam_search", str(e))


def check_finish(path: str, finish_reasons: list[str | None], stop_reasons: list[int | None], limits: Limits) -> None:
    for reason in set(finish_reasons) - set(FINISH_REASONS):
        fail(f"{path}.finish_reasons", f"unknown finish reason {reason!r}")
    check_ids(f"{path}.stop_reasons", [s for s in stop_reasons if s is not None], limits.vocab_size)
