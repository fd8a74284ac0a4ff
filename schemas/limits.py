"""Value ranges: what a message may hold beyond its types, checked where a service takes it from a stream.

The codec checks a message's shape (types, sizes); a schema-valid message can still hold a token id of 10^9 or a
block id beyond the KV pool, and one such plan crashed the worker and failed every request in flight. So each
message class has validate(limits), next to its schema, and a service decodes with its limits:

    plan = decode(PlanMessage, data, limits)     # SchemaError names the field and the range it broke

A message that fails is dead-lettered and the service keeps serving: no service trusts another's message further
than its schema and these ranges. Limits come from the worker's registration (WorkerInfo), which every consumer
of a worker's pool reads; the tokenizer, which has no pool, knows the vocabulary and max_model_len only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from schemas.codec import SchemaError

MAX_NUM_STEPS = 1024               # steps of one plan; the scheduler sends num_scheduler_steps (8 by default)
MAX_COMPLETIONS = 1024             # n: completions of one request (each one a sequence of the pool)
MAX_SEQ_ID = (1 << 63) - 1         # sequence ids are counters: non-negative int64
FINISH_REASONS = (None, "stop", "length", "abort")


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    num_blocks: int = 0            # the KV pool; 0 where it is not known (the tokenizer)
    block_size: int = 0

    @classmethod
    def of(cls, info) -> Limits:
        """The limits of a worker, from its WorkerInfo (which validate() has checked)."""
        return cls(info.vocab_size, info.max_model_len, info.num_blocks, info.block_size)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


def fail(path: str, problem: str) -> None:
    raise SchemaError(f"{path}: {problem}")


def check_range(path: str, value: int | float, low: int | float, high: int | float) -> None:
    """low <= value <= high, for a number (NaN fails)."""
    if not low <= value <= high:
        fail(path, f"{value!r} is outside [{low}, {high}]")


def check_ids(path: str, values: Iterable[int], bound: int) -> None:
    """Every value in [0, bound): token ids below the vocabulary, block ids below the pool size."""
    values = values if isinstance(values, list) else list(values)
    if values and (min(values) < 0 or max(values) >= bound):
        bad = [v for v in values if not 0 <= v < bound][:5]
        fail(path, f"ids must be in [0, {bound}), got {bad}")


def check_aligned(path: str, **columns: list) -> None:
    """Columns of one columnar message: one entry per item, so all of one length."""
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        fail(path, f"columns of unequal lengths {lengths}")


def check_finite(path: str, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            fail(f"{path}.{name}", f"must be finite, got {value!r}")


def check_params(path: str, params, limits: Limits, lengths: bool = True) -> None:
    """SamplingParams' own checks ran when it was decoded; these are the ones that need the model's limits, and
    the bounds that keep the sampler's arithmetic finite (a temperature of inf makes NaN probabilities).
    lengths=False leaves max_tokens and min_tokens to the input processor, which answers a client that asked
    for too many with the message clients know (the tokenizer); past it, they are bounded."""
    check_finite(path, temperature=params.temperature, top_p=params.top_p, min_p=params.min_p,
                 presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                 repetition_penalty=params.repetition_penalty)
    check_range(f"{path}.n", params.n, 1, MAX_COMPLETIONS)
    check_range(f"{path}.best_of", params.num_sequences, 1, MAX_COMPLETIONS)
    check_ids(f"{path}.stop_token_ids", params.stop_token_ids, limits.vocab_size)
    check_ids(f"{path}.logit_bias", list(params.logit_bias or ()), limits.vocab_size)
    check_ids(f"{path}.allowed_token_ids", params.allowed_token_ids or [], limits.vocab_size)
    for word in params.bad_words_token_ids or ():
        check_ids(f"{path}.bad_words_token_ids", word, limits.vocab_size)
    if params.logit_bias is not None:
        check_finite(path, **{f"logit_bias[{t}]": b for t, b in params.logit_bias.items()})
    if lengths:
        if params.max_tokens is not None:
            check_range(f"{path}.max_tokens", params.max_tokens, 1, limits.max_model_len)
        check_range(f"{path}.min_tokens", params.min_tokens, 0, limits.max_model_len)
    if params.seed is not None:
        check_range(f"{path}.seed", params.seed, -(1 << 63), (1 << 64) - 1)
