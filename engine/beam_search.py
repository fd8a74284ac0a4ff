"""Beam search, as vLLM's: which beams of a request live on after each step.

A beam search request is a group of up to beam_width sequences, the live beams, sharing their common prefix's KV
blocks. Each step, every live beam computes its last token and proposes the top 2 x beam_width tokens of its
log-softmax (the sampler's logprobs stage); those candidates must be on the host, so a beam runs one step per plan
(other sequences of the plan still run its k steps). Once every live beam of the group has proposed, rank():
a candidate that ends its beam (EOS, a stop token id) is set aside, completed; of the others, the best beam_width
by score live on. The Scheduler then continues each parent with its first kept candidate in place, forks it
(its blocks shared, copy-on-write) for each further one, and frees the parents that kept none. When the beams
reach max_tokens or the context, the best beam_width of the completed and the live ones, by score, are the
result, best first.

The score is vLLM's get_beam_search_score: cumulative logprob / length ** length_penalty, where the length counts
the prompt and the generated tokens, less a final EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.sequence import FinishReason, Sequence, check_stop
from schemas.beam_search_params import BeamSearchParams


def beam_search_score(token_ids: list[int], cum_logprob: float, eos_token_ids: frozenset[int],
                      length_penalty: float = 1.0) -> float:
    length = len(token_ids) - (token_ids[-1] in eos_token_ids)
    return cum_logprob / (length ** length_penalty)


@dataclass
class Beam:
    """A finished beam: its prompt and generated tokens."""
    token_ids: list[int]
    num_prompt_tokens: int
    cum_logprob: float
    score: float
    finish_reason: FinishReason
    stop_reason: int | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class Continuation:
    """A kept candidate: parent's tokens plus token_id."""
    parent: Sequence
    token_id: int
    cum_logprob: float
    score: float
    reaches_length: bool           # the beams end here: max_tokens or the context is reached


@dataclass
class BeamSearchResult:
    """A finished search, for the engine or the scheduler service to hand to its client."""
    request_id: str
    beams: list[Beam]              # best first: the n the request returns
    kv_blocks_saved: int           # the most KV blocks the beams shared at once, against independent sequences


class BeamGroup:
    """One beam search request, as the Scheduler keeps it."""

    def __init__(self, params: BeamSearchParams, num_returned: int, eos_token_ids: frozenset[int],
                 max_model_len: int):
        self.params, self.num_returned = params, num_returned
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        self.beams: list[Sequence] = []                         # live, best first
        self.cum_logprobs: dict[int, float] = {}                # live seq id -> cumulative logprob
        self.candidates: dict[int, list[tuple[int, float]]] = {}   # seq id -> its last step's (token, logprob)
        self.completed: list[Beam] = []
        self.kv_blocks_saved = 0                                # now
        self.peak_kv_blocks_saved = 0

    def is_beam(self, seq: Sequence) -> bool:
        return seq.seq_id in self.cum_logprobs

    def ready(self) -> bool:
        """Whether every live beam has proposed its candidates: the step can be ranked."""
        return all(s.seq_id in self.candidates for s in self.beams)

    def waits(self, seq: Sequence) -> bool:
        """Whether seq cannot compute now: its candidates are in flight, or in and waiting for its siblings'."""
        return seq.num_inflight > 0 or seq.seq_id in self.candidates

    def rank(self) -> list[Continuation]:
        """One step: completed beams set aside, the best beam_width continuations returned, best first (ties
        keep beam order, then candidate order: as vLLM's stable sort)."""
        kept = []
        for beam in self.beams:
            for token, logprob in self.candidates[beam.seq_id]:
                tokens = beam.token_ids + [token]
                cum = self.cum_logprobs[beam.seq_id] + logprob
                score = beam_search_score(tokens, cum, self.eos_token_ids, self.params.length_penalty)
                stop = check_stop(beam.params, token, beam.num_output_tokens + 1, len(tokens), self.eos_token_ids,
                                  self.max_model_len)
                if stop is not None and stop[0] is FinishReason.STOP:
                    self.completed.append(Beam(tokens, beam.num_prompt_tokens, cum, score, *stop))
                else:
                    kept.append(Continuation(beam, token, cum, score, stop is not None))
        kept.sort(key=lambda c: c.score, reverse=True)
        self.candidates.clear()
        return kept[:self.params.beam_width]

    def result(self, request_id: str, last: list[Continuation]) -> BeamSearchResult:
        """The search is over: last are the live beams' final continuations."""
        beams = self.completed + [Beam(c.parent.token_ids + [c.token_id], c.parent.num_prompt_tokens, c.cum_logprob,
                                       c.score, FinishReason.LENGTH) for c in last]
        beams.sort(key=lambda b: b.score, reverse=True)
        return BeamSearchResult(request_id, beams[:self.num_returned], self.peak_kv_blocks_saved)

    def observe_blocks(self) -> None:
        """How many KV blocks the live beams share now: what independent sequences would hold more."""
        tables = [s.block_ids for s in self.beams]
        self.kv_blocks_saved = sum(map(len, tables)) - len(set().union(*tables))
        self.peak_kv_blocks_saved = max(self.peak_kv_blocks_saved, self.kv_blocks_saved)
