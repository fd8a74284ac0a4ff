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
MAX_LOGIT_BIAS = 100.0                     # OpenAI: each bias is in [-100, 100]


@dataclass
class SamplingParams:
    n: int = 1                             # independent completions of one prompt (share the prompt's KV blocks)
    best_of: int | None = None             # generate this many (>= n), return the n of highest cumulative logprob
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
    prompt_logprobs: int | None = None     # None: none; k: each prompt token's logprob (but the first's) and top k
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None      # OpenAI: token id -> bias added to its logit before sampling
    allowed_token_ids: list[int] | None = None      # only these may be sampled
    bad_words: list[str] = field(default_factory=list)   # never generated (see bad_words_token_ids)
    # bad_words as token sequences, with and without a leading space: filled in by the input processor (which
    # has the tokenizer), so they travel with the request. A one-token word is never sampled; a longer word's
    # last token is banned right after the tokens before it were generated.
    bad_words_token_ids: list[list[int]] | None = None
    structured_outputs: StructuredOutputsParams | None = None   # a JSON schema, regex, choice or grammar the
                                                                # completion must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.bad_words = list(self.bad_words)
        if self.logit_bias is not None:         # JSON object keys are strings: "50256" means token 50256
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
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
        check(self.best_of is None or (isinstance(self.best_of, int) and self.best_of >= self.n),
              f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                               and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs!r}")
        if self.logit_bias is not None:
            check(all(isinstance(t, int) and t >= 0 for t in self.logit_bias),
                  "logit_bias keys must be token ids (non-negative integers)")
            check(all(isinstance(b, (int, float)) and not isinstance(b, bool)
                      and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for b in self.logit_bias.values()),
                  f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.allowed_token_ids is not None:
            check(len(self.allowed_token_ids) > 0, "allowed_token_ids must not be empty")
            check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.allowed_token_ids),
                  "allowed_token_ids must be non-negative integers")
        check(all(isinstance(w, str) and w.strip() for w in self.bad_words),
              "bad_words must be a list of non-blank strings")
        if self.bad_words_token_ids is not None:
            check(all(isinstance(w, list) and w and all(isinstance(t, int) and t >= 0 for t in w)
                      for w in self.bad_words_token_ids),
                  "bad_words_token_ids must be non-empty lists of non-negative integers")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def num_sequences(self) -> int:
        """Completions generated: best_of where it is set, else n."""
        return self.best_of or self.n

    @property
    def ranks_by_logprob(self) -> bool:
        """Whether the n returned are chosen among more (best_of > n): each sampled token's logprob is needed."""
        return self.num_sequences > self.n


def _token_key(key) -> int:
    """A logit_bias key: an integer, or the decimal string JSON makes of one."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
