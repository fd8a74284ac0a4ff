"""Per-request sampling parameters, with the meanings and defaults users know from vLLM and the OpenAI API.

Part of the wire contract (requests and plans carry them between the services); users import them as
`from engine import SamplingParams`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.structured_outputs import StructuredOutputsParams

# Temperatures below this are greedy: dividing logits by ~0 would only amplify noise.
GREEDY_EPSILON = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1                             # independent completions of one prompt (share the prompt's KV blocks)
    temperature: float = 1.0               # 0: greedy
    top_p: float = 1.0                     # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0                         # 0 or -1: off
    min_p: float = 0.0                     # drop tokens below min_p x the top token's probability
    seed: int | None = None                # a seeded request draws the same tokens whatever it is batched with
    presence_penalty: float = 0.0          # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0         # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0        # CTRL/HF: divide positive (multiply negative) logits of seen tokens
    max_tokens: int | None = 16            # None: up to max_model_len
    min_tokens: int = 0                    # EOS and stop tokens are masked until this many were generated
    stop: list[str] = field(default_factory=list)            # stop strings (applied by the detokenizer)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None            # None: none; k: the sampled token's logprob and the top k
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None   # a JSON schema, regex, choice or grammar the
                                                                # completion must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
              f"min_tokens must be >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative integers")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON
