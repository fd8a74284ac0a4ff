"""Beam search parameters, as vLLM's `BeamSearchParams`: `LLM.beam_search(prompts, BeamSearchParams(...))`, and what
a served request with `use_beam_search: true` carries through the pipeline beside its SamplingParams.

A beam search request still has SamplingParams (those the input and output processors read: max_tokens,
ignore_eos, n, skip_special_tokens); `sampling_params()` makes them, and `check_beam_search` says which of their
fields beam search cannot honour. Part of the wire contract, so it imports nothing of the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.sampling_params import GREEDY_EPSILON, MAX_LOGPROBS, SamplingParams

# Each step a beam's candidates are the top 2 x beam_width tokens of its log-softmax, which the sampler's logprobs
# stage computes: so beam_width is bounded by half of the logprobs it serves.
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int | None                 # None: up to the context length (the chat API's default)
    ignore_eos: bool = False
    temperature: float = 0.0               # beam search ranks the model's own log-probabilities: only 0
    length_penalty: float = 1.0            # score = cumulative logprob / length ** length_penalty

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.beam_width, int) and 1 <= self.beam_width <= MAX_BEAM_WIDTH,
              f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(self.temperature < GREEDY_EPSILON and self.temperature >= 0,
              f"temperature must be 0 with beam search, got {self.temperature}")
        check(math.isfinite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}")

    @property
    def num_candidates(self) -> int:
        """Tokens each live beam proposes per step (as vLLM: 2 x beam_width, so that beam_width of them are left
        whatever EOS takes)."""
        return 2 * self.beam_width

    def sampling_params(self, n: int | None = None, skip_special_tokens: bool = True) -> SamplingParams:
        """The request's SamplingParams: n beams returned (all of them by default), greedy, the same lengths."""
        return SamplingParams(n=self.beam_width if n is None else n, temperature=0.0, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, skip_special_tokens=skip_special_tokens)


def check_beam_search(params: SamplingParams, beam: BeamSearchParams) -> None:
    """ValueError, with a message for the client, when params ask for what beam search does not do: candidates
    are the model's raw log-probabilities, so no sampling filter, penalty or min_tokens applies to them; a beam
    ends on EOS or a stop token id, never on a stop string (the text is only made once the search is over)."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    check(params.n <= beam.beam_width, f"n ({params.n}) must not exceed the beam width ({beam.beam_width}): "
          "beam search returns the best n of its beams")
    check(params.max_tokens == beam.max_tokens and params.ignore_eos == beam.ignore_eos,
          "max_tokens and ignore_eos must be the same in the sampling and the beam search parameters")
    check(params.greedy, "temperature must be 0 (or left out) with beam search")
    check(params.top_p == 1.0 and params.top_k == 0 and params.min_p == 0.0,
          "top_p, top_k and min_p cannot be used with beam search")
    check(params.presence_penalty == 0.0 and params.frequency_penalty == 0.0 and params.repetition_penalty == 1.0,
          "presence, frequency and repetition penalties cannot be used with beam search")
    check(params.min_tokens == 0, "min_tokens cannot be used with beam search")
    check(not params.stop, "stop strings cannot be used with beam search (stop_token_ids can)")
    check(params.logprobs is None, "logprobs cannot be used with beam search")
    check(params.prompt_logprobs is None, "prompt_logprobs cannot be used with beam search")
    check(params.logit_bias is None and params.allowed_token_ids is None and not params.bad_words,
          "logit_bias, allowed_token_ids and bad_words cannot be used with beam search")
    check(params.best_of is None, "best_of is the beam width with beam search, not a sampling parameter")
    check(params.structured_outputs is None, "structured outputs cannot be used with beam search")
