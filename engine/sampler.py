"""Batched sampling on the device: grammar bitmask, allowed tokens, bad words, logit bias, penalties, min_tokens,
greedy, temperature, top-k, top-p, min-p, logprobs.

Every stage is a few tensor ops over the whole batch [B, V]; stages no row needs are skipped. Randomness is a
counter-based hash of (row seed, row step, token id), so a seeded row draws the same token whatever it is
batched with, and no generator state lives anywhere.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import chain

import torch

from engine.staging import columns_to_device, to_device
from schemas.sampling_params import SamplingParams


def _int64(x: int) -> int:
    """An arbitrary Python int as the int64 with the same low 64 bits (two's complement)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64 constants, as the int64 values torch can hold.
_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits makes it logical.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64_top(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer without its last xorshift, which leaves the top 31 bits as they are."""
    x = (x ^ _shr(x, 30)) * _MIX1      # int64 multiplication wraps mod 2^64, as the algorithm wants
    return (x ^ _shr(x, 27)) * _MIX2


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors."""
    x = _mix64_top(x)
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[b, v] in (0, 1), a pure function of (seeds[b], steps[b], v): [B], [B] int64 -> [B, V] float32.
    The top 23 bits of splitmix64's v-th output from the state key[b]."""
    noise = _fused_uniform() if seeds.is_cuda else _uniform
    return noise(seeds, steps, _counters(vocab_size, seeds.device))


@cache
def _counters(vocab_size: int, device: torch.device) -> torch.Tensor:
    """splitmix64's state increments for outputs 1..V, [V] int64. A tensor, not arange * constant inside the
    compiled function: Inductor would fold that product into a 32-bit index expression, where the constant
    does not fit."""
    return torch.arange(1, vocab_size + 1, device=device) * _GOLDEN


def _uniform(seeds: torch.Tensor, steps: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    key = mix64(mix64(seeds) + steps)                                   # [B]: one stream per (seed, step)
    top = _mix64_top(key[:, None] + counters) >> 41                     # [B, V]: top 23 bits, signed
    # top is in [-2^22, 2^22); (top + 2^22 + 0.5) / 2^23 is exact in float32 and never 0 or 1, so -log(u) is
    # finite and positive. Adding a float to the int64 tensor converts it in the same pass over [B, V].
    return (top + (2**22 + 0.5)) * 2.0**-23


@cache
def _fused_uniform():
    # Eager, uniform() is ~10 passes over [B, V] int64: 2.2 ms at B=256, V=128k on an H100. Compiled into one
    # kernel it takes 0.13 ms and gives the same bits (integer ops only). CPU, where tests run, stays eager.
    # Compiled in this process: by default Inductor boots a pool of compile workers in the background, a process
    # per core, each importing torch. A served worker's came up during the first requests after its warm-up (17
    # processes on a 16-core host, beside the services), and one small kernel does not need it.
    import torch._inductor.config
    torch._inductor.config.compile_threads = 1
    return torch.compile(_uniform, dynamic=True)


@dataclass
class SamplingRow:                 # one row of the batch: one sequence that samples a token this step
    params: SamplingParams
    seed: int                      # the request's seed, or one drawn by the engine for unseeded requests
    token_ids: Sequence[int]       # the prompt, then the tokens generated so far (the RNG counter is their number)
    num_prompt_tokens: int

    # Slices on demand: only some stages read the tokens, and a batch is built for every plan.
    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> Sequence[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class Penalties:
    presence: torch.Tensor         # [B] float32
    frequency: torch.Tensor        # [B] float32
    repetition: torch.Tensor       # [B] float32
    output_counts: torch.Tensor    # [B, V] float32: occurrences of each token in the output so far
    seen: torch.Tensor             # [B, V] bool: token occurs in the prompt or the output


@dataclass
class HeldTokens:                  # min_tokens: token_ids[i] of rows[i] is masked while steps[rows[i]] < until[i]
    rows: torch.Tensor             # [N] int64
    token_ids: torch.Tensor        # [N] int64
    until: torch.Tensor            # [N] int64: the row's min_tokens


@dataclass
class LogitBias:                   # logit_bias: values[i] is added to logit token_ids[i] of row rows[i]
    rows: torch.Tensor             # [N] int64
    token_ids: torch.Tensor        # [N] int64
    values: torch.Tensor           # [N] float32


@dataclass
class BadWords:
    """bad_words: word i bans token last[i] of row rows[i] when that row's last generated tokens are the word's
    prefix. Prefixes are right-aligned in [N, M] (M: the longest prefix in the batch), `care` marking their
    tokens; a one-token word cares about nothing, so it is always banned. recent [B, M] holds each row's last M
    generated tokens (-1 before the first), advanced on the device with the batch."""
    rows: torch.Tensor             # [N] int64
    last: torch.Tensor             # [N] int64
    prefixes: torch.Tensor         # [N, M] int64
    care: torch.Tensor             # [N, M] bool
    recent: torch.Tensor           # [B, M] int64


@dataclass
class TokenBitmask:                # structured output: what each constrained row may sample this step
    rows: torch.Tensor             # [C] int64: the constrained rows of the batch
    bitmask: torch.Tensor          # [C, ceil(V / 32)] int32: bit v % 32 of word v // 32 set <=> token v allowed


@dataclass
class SamplingBatch:               # device tensors for a batch, built once per step (or advanced on the device)
    vocab_size: int
    greedy: torch.Tensor           # [B] bool
    temperature: torch.Tensor      # [B] float32, 1.0 on greedy rows so the division stays finite
    top_k: torch.Tensor            # [B] int64, vocab_size where off
    top_p: torch.Tensor            # [B] float32
    min_p: torch.Tensor            # [B] float32
    seeds: torch.Tensor            # [B] int64
    steps: torch.Tensor            # [B] int64: len(output_token_ids)
    all_greedy: bool
    all_random: bool
    max_top_k: int                 # 0 when no row uses top-k
    do_top_p: bool
    do_min_p: bool
    penalties: Penalties | None
    held: HeldTokens | None
    max_logprobs: int | None       # None when no row asked for logprobs
    disallowed: torch.Tensor | None = None    # [B, V] bool: outside a row's allowed_token_ids
    bad_words: BadWords | None = None
    logit_bias: LogitBias | None = None
    # Filled on the host for each step from the constrained rows' matchers (engine/structured_output.py); None
    # when no row of the step is constrained.
    token_bitmask: TokenBitmask | None = None

    @classmethod
    def from_rows(cls, rows: list[SamplingRow], vocab_size: int, eos_token_ids: Collection[int],
                  device: torch.device | str) -> SamplingBatch:
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        used_top_k = [k for k in top_k if k < vocab_size]
        # best_of ranks its completions by their tokens' logprobs: those rows need them even if not asked
        asked = [p.logprobs or 0 for p in params
                 if p.logprobs is not None or (p.best_of is not None and p.best_of > p.n)]
        # One look at every row for the three masking stages, which few requests use.
        masks = any(p.allowed_token_ids is not None or p.bad_words_token_ids or p.logit_bias for p in params)
        columns = {"greedy": (greedy, torch.bool),
                   "temperature": ([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
                   "top_k": (top_k, torch.int64),
                   "top_p": ([p.top_p for p in params], torch.float32),
                   "min_p": ([p.min_p for p in params], torch.float32),
                   "seeds": ([_int64(r.seed) for r in rows], torch.int64),
                   "steps": ([r.num_output_tokens for r in rows], torch.int64)}
        return cls(
            vocab_size=vocab_size,
            **dict(zip(columns, columns_to_device(list(columns.values()), device))),      # in one copy
            all_greedy=all(greedy),
            all_random=not any(greedy),
            max_top_k=max(used_top_k, default=0),
            do_top_p=any(p.top_p < 1.0 for p in params),
            do_min_p=any(p.min_p > 0.0 for p in params),
            penalties=_penalties(rows, vocab_size, device),
            held=_held_tokens(rows, vocab_size, eos_token_ids, device),
            max_logprobs=max(asked, default=None),
            disallowed=_disallowed(params, vocab_size, device) if masks else None,
            bad_words=_bad_words(rows, vocab_size, device) if masks else None,
            logit_bias=_logit_bias(params, vocab_size, device) if masks else None,
        )

    def advance(self, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Append tokens [B] to every row (or to the rows where the bool mask `rows` is set), on the device:
        multi-step decoding needs no CPU trip."""
        index = (torch.arange(len(token_ids), device=token_ids.device), token_ids)       # one token a row
        if self.bad_words is not None:
            recent = self.bad_words.recent
            shifted = torch.cat([recent[:, 1:], token_ids[:, None]], dim=1)
            recent.copy_(shifted if rows is None else torch.where(rows[:, None], shifted, recent))
        if rows is None:
            self.steps += 1
            if self.penalties is not None:
                self.penalties.output_counts[index] += 1
                # new_ones makes the True on the device: a host scalar would be a copy, which CUDA graphs refuse.
                self.penalties.seen.index_put_(index, self.penalties.seen.new_ones(()))
            return
        self.steps += rows
        if self.penalties is not None:
            self.penalties.output_counts.index_put_(index, rows.float(), accumulate=True)
            self.penalties.seen.index_put_(index, self.penalties.seen[index] | rows)


def _tensor(values: list, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return to_device(values, dtype, device)


def _token_counts(token_lists: list[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """[B, V] float32 occurrence counts, from one flat tensor of all the tokens: no padding, no device sync."""
    tokens = _tensor(list(chain.from_iterable(token_lists)), device, torch.int64)
    lengths = _tensor([len(t) for t in token_lists], device, torch.int64)
    rows = torch.arange(len(token_lists), device=device).repeat_interleave(lengths, output_size=len(tokens))
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    return counts.index_put_((rows, tokens), counts.new_ones(len(tokens)), accumulate=True)


def _penalties(rows: list[SamplingRow], vocab_size: int, device: torch.device | str) -> Penalties | None:
    params = [r.params for r in rows]
    if all(p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params):
        return None
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab_size, device)
    prompt_counts = _token_counts([r.prompt_token_ids for r in rows], vocab_size, device)
    return Penalties(_tensor([p.presence_penalty for p in params], device),
                     _tensor([p.frequency_penalty for p in params], device),
                     _tensor([p.repetition_penalty for p in params], device),
                     output_counts, seen=(output_counts > 0) | (prompt_counts > 0))


def _held_tokens(rows: list[SamplingRow], vocab_size: int, eos_token_ids: Collection[int],
                 device: torch.device | str) -> HeldTokens | None:
    # As vLLM: the tokens held back are the row's stop tokens, which include EOS unless ignore_eos
    # (with ignore_eos, EOS does not end the sequence, so there is nothing to hold back).
    triples = []
    for b, r in enumerate(rows):
        p = r.params        # the cheap tests first: this runs for every row of every plan
        if p.min_tokens and (p.stop_token_ids or not p.ignore_eos) and r.num_output_tokens < p.min_tokens:
            held = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            triples += [(b, t, p.min_tokens) for t in sorted(held) if t < vocab_size]
    if not triples:
        return None
    return HeldTokens(*(_tensor(list(column), device, torch.int64) for column in zip(*triples)))


def _disallowed(params: list[SamplingParams], vocab_size: int, device: torch.device | str) -> torch.Tensor | None:
    restricted = [b for b, p in enumerate(params) if p.allowed_token_ids is not None]
    if not restricted:
        return None
    pairs = [(b, t) for b in restricted for t in params[b].allowed_token_ids if t < vocab_size]
    mask = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
    mask[_tensor(restricted, device, torch.int64)] = True
    rows, tokens = (_tensor(list(column), device, torch.int64) for column in zip(*pairs)) if pairs else \
        (_tensor([], device, torch.int64),) * 2
    return mask.index_put_((rows, tokens), mask.new_zeros(()))


def _bad_words(rows: list[SamplingRow], vocab_size: int, device: torch.device | str) -> BadWords | None:
    words = [(b, w) for b, r in enumerate(rows) for w in r.params.bad_words_token_ids or () if w[-1] < vocab_size]
    if not words:
        return None
    m = max(1, max(len(w) - 1 for _, w in words))           # at least one column: torch keeps shapes simple
    prefixes = [[-1] * (m - len(w) + 1) + w[:-1] for _, w in words]
    care = [[False] * (m - len(w) + 1) + [True] * (len(w) - 1) for _, w in words]
    recent = [([-1] * m + list(r.output_token_ids[-m:]))[-m:] for r in rows]
    return BadWords(_tensor([b for b, _ in words], device, torch.int64),
                    _tensor([w[-1] for _, w in words], device, torch.int64),
                    _tensor(prefixes, device, torch.int64), _tensor(care, device, torch.bool),
                    _tensor(recent, device, torch.int64))


def _logit_bias(params: list[SamplingParams], vocab_size: int, device: torch.device | str) -> LogitBias | None:
    triples = [(b, t, v) for b, p in enumerate(params) for t, v in (p.logit_bias or {}).items() if t < vocab_size]
    if not triples:
        return None
    rows, tokens, values = zip(*triples)
    return LogitBias(_tensor(list(rows), device, torch.int64), _tensor(list(tokens), device, torch.int64),
                     _tensor(list(values), device))


def apply_allowed_token_ids(logits: torch.Tensor, disallowed: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(disallowed, float("-inf"))


def apply_bad_words(logits: torch.Tensor, bad: BadWords) -> torch.Tensor:
    """-inf on each word's last token where the row just generated the rest of the word; reads `recent` on the
    device, so multi-step decoding needs no host trip."""
    match = ((bad.recent[bad.rows] == bad.prefixes) | ~bad.care).all(dim=-1)          # [N]
    ban = torch.zeros_like(match, dtype=logits.dtype).masked_fill(match, float("-inf"))
    # accumulate: several words may end in the same token of a row (-inf + 0 stays -inf)
    return logits.index_put((bad.rows, bad.last), ban, accumulate=True)


def apply_logit_bias(logits: torch.Tensor, bias: LogitBias) -> torch.Tensor:
    return logits.index_put((bias.rows, bias.token_ids), bias.values, accumulate=True)


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> torch.Tensor:
    """-inf on the tokens a constrained row's grammar does not allow; only the constrained rows are touched."""
    words = mask.bitmask                                                 # [C, W] int32
    bits = (words[:, :, None] >> _bit_positions(words.device)) & 1      # [C, W, 32]: >> on int32 keeps bit 31
    allowed = bits.view(len(words), -1)[:, :logits.shape[-1]].bool()    # [C, V]
    rows = logits.index_select(0, mask.rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, mask.rows, rows)


@cache
def _bit_positions(device: torch.device) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Repetition (CTRL/HF) over prompt + output, then OpenAI frequency and presence over the output. [B, V]."""
    repetition = penalties.repetition[:, None]
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(penalties.seen, scaled, logits)
    counts = penalties.output_counts
    return logits - penalties.frequency[:, None] * counts - penalties.presence[:, None] * (counts > 0)


def apply_min_tokens(logits: torch.Tensor, held: HeldTokens, steps: torch.Tensor) -> torch.Tensor:
    """-inf on the held tokens of rows that have fewer than min_tokens outputs; reads steps on the device."""
    index = (held.rows, held.token_ids)
    return logits.index_put(index, logits[index].masked_fill(steps[held.rows] < held.until, float("-inf")))


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Top-k without a full sort: drop what is below each row's k-th largest logit."""
    top = logits.topk(max_k, dim=-1).values                             # [B, max_k], descending
    kth = top.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])         # [B, 1]
    kth = kth.masked_fill(top_k[:, None] > max_k, float("-inf"))        # rows with top-k off keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One ascending sort serves both; top-p then sees the distribution renormalized over the top k."""
    sorted_logits, order = logits.sort(dim=-1)                          # [B, V], ascending
    positions = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits.masked_fill_(positions < (logits.shape[-1] - top_k)[:, None], float("-inf"))
    # As vLLM: drop the least likely tokens while their total stays within 1 - top_p (top_p = 1 drops only
    # tokens of probability 0); the most likely token survives whatever rounding does to the cumulative sum.
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)[:, None]
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p), so no softmax is needed; min_p = 0 keeps all.
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, filters, then the exponential race: argmax(p / E), E ~ Exp(1), draws token v with prob p_v."""
    logits = logits / batch.temperature[:, None]
    if batch.do_top_p:
        logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    elif batch.max_top_k:
        logits = _apply_top_k(logits, batch.top_k, batch.max_top_k)
    if batch.do_min_p:
        logits = _apply_min_p(logits, batch.min_p)
    exponential = -uniform(batch.seeds, batch.steps, batch.vocab_size).log()      # [B, V], finite and > 0
    # Filtered tokens score exactly 0 while the top token scores > 0: a sampled token always has p > 0.
    return (logits.softmax(dim=-1) / exponential).argmax(dim=-1)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor              # [B] int64
    logprobs: torch.Tensor | None        # [B] float32: logprob of the sampled token
    top_token_ids: torch.Tensor | None   # [B, K] int64, K = max logprobs asked in the batch
    top_logprobs: torch.Tensor | None    # [B, K] float32


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # An lm_head padded past the tokenizer's vocabulary must never yield its padding columns.
        logits = logits[:, :batch.vocab_size].float()                   # [B, V]
        # As vLLM: the grammar masks the logits themselves, so logprobs are those of the allowed tokens.
        if batch.token_bitmask is not None:
            logits = apply_token_bitmask(logits, batch.token_bitmask)
        # Logprobs are the model's own (vLLM's default): before penalties and temperature.
        raw_logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs is not None else None
        # As vLLM: allowed tokens, bad words, logit bias, then penalties.
        if batch.disallowed is not None:
            logits = apply_allowed_token_ids(logits, batch.disallowed)
        if batch.bad_words is not None:
            logits = apply_bad_words(logits, batch.bad_words)
        if batch.logit_bias is not None:
            logits = apply_logit_bias(logits, batch.logit_bias)
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        if batch.held is not None:
            logits = apply_min_tokens(logits, batch.held, batch.steps)

        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        elif batch.all_random:
            token_ids = _sample(logits, batch)
        else:
            token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), _sample(logits, batch))

        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        top_logprobs, top_token_ids = raw_logprobs.topk(batch.max_logprobs, dim=-1)
        sampled = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        return SamplerOutput(token_ids, sampled, top_token_ids, top_logprobs)
