"""Structured output: a grammar compiled once per spec, a matcher per sequence, a token bitmask per step.

    grammars = Grammars(tokenizer, vocab_size, eos_token_ids)  # xgrammar over the local tokenizer, LRU-cached
    grammars.compile(spec)            # validates: ValueError with xgrammar's message (the client's 400)
    grammars.prefetch(spec)           # compiles in the background (xgrammar releases the GIL)
    state = grammars.state(spec)                    # one per sequence
    mask = token_bitmask(states, rows, ...)         # engine/sampler.py applies it on the device

Where grammars compile (measured on this machine's CPU, SmolLM2's 49,152-token vocabulary, a nested schema with
an enum array, bounded integers and a pattern): compiling takes 12-27 ms; the compiled grammar serializes to
167 KB in 10 ms and deserializes in 8 ms. Shipping it to the worker would put 167 KB on every plan that admits
the request and still cost the worker most of a compile, so each process compiles for itself, each spec once
(LRU by StructuredOutputsParams.key()): the tokenizer service compiles to validate (a bad schema is the client's
400 before it reaches the scheduler), and the worker compiles in a thread of its own, started when its plan
reader takes the plan that admits the request (services/worker.py), so the compile overlaps the plans ahead and
the prompt's prefill; the model loop waits only if the prompt's first token is due before the compile is done.
In one process (LLMEngine) the input processor and the runner share one cache: a spec compiles once.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING

import torch

from engine.sampler import TokenBitmask
from engine.staging import to_device
from schemas.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

log = logging.getLogger("pagestream.structured_output")

MAX_CACHED_GRAMMARS = 256          # ~200 KB each for a 49k vocabulary
COMPILER_THREADS = 4
MAX_WHITESPACE = 16                # JSON: whitespace characters between two elements; unbounded, a sampled
                                   # completion can spend all its tokens on newlines
# xgrammar's messages start with where in its C++ they were raised: "[18:21:34] /project/cpp/x.cc:94: ".
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _xgrammar():
    import xgrammar               # imported on first use: 0.7 s that a process serving no grammar never pays
    return xgrammar


class Grammars:
    """xgrammar's compiler over the model's own tokenizer (never a hub), with an LRU cache of compiled grammars
    keyed by the spec. Thread-safe: the worker's plan reader prefetches while its model loop takes results."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: Collection[int],
                 max_cached: int = MAX_CACHED_GRAMMARS):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None
        self._json_safe_row: torch.Tensor | None = None
        # One compile at a time (xgrammar parallelizes each over COMPILER_THREADS).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.num_compiled = 0          # grammars compiled (not taken from the cache)

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar (xgrammar's CompiledGrammar); ValueError saying why it cannot compile."""
        return self.future(spec).result()

    def prefetch(self, spec: StructuredOutputsParams) -> None:
        self.future(spec)

    def state(self, spec: StructuredOutputsParams) -> GrammarState:
        """A new sequence's matcher state (its grammar compiles in the background, if it is not cached)."""
        # JSON-schema rows, and tool calls (a structural tag holding JSON-schema arguments), never sample raw
        # control characters: xgrammar 0.2.9 lets them into length-bounded strings, where JSON forbids them.
        json_rows = spec.kind in ("json", "structural_tag")
        return GrammarState(self.future(spec), self._json_safe() if json_rows and self.available else None)

    def future(self, spec: StructuredOutputsParams) -> Future:
        """The spec's compiled grammar, cached or on its way (a failed compile is cached too: it fails again)."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._cache[key] = self._executor.submit(self._compile, spec)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: StructuredOutputsParams):
        if self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer, and this model runs without one "
                             "(dummy weights without --tokenizer, or --tokenizer none)")
        compiler = self._get_compiler()
        kind, any_whitespace = spec.kind, not spec.disable_any_whitespace
        try:
            if kind == "json":
                grammar = compiler.compile_json_schema(spec.json, any_whitespace=any_whitespace,
                                                       max_whitespace_cnt=MAX_WHITESPACE if any_whitespace else None)
            elif kind == "json_object":
                grammar = compiler.compile_builtin_json_grammar()
            elif kind == "regex":
                grammar = compiler.compile_regex(spec.regex)
            elif kind == "choice":
                # JSON string literals are EBNF string literals: quotes, backslashes and control characters escaped.
                grammar = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            elif kind == "grammar":
                grammar = compiler.compile_grammar(spec.grammar)
            else:
                grammar = compiler.compile_structural_tag(spec.structural_tag)
        except Exception as e:         # xgrammar raises RuntimeError, ValueError, its own JSON errors...
            message = _SOURCE_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise ValueError(f"structured outputs: the {kind} cannot be compiled: {message}") from None
        with self._lock:
            self.num_compiled += 1
        return grammar

    def load(self) -> None:
        """Import xgrammar and index the vocabulary (about a second) now rather than at the first request."""
        self._get_compiler()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                # vocab_size is the model's (its lm_head may be padded past the tokenizer): the ids beyond the
                # tokenizer are never allowed. EOS ends a grammar: the engine's EOS ids are its stop tokens.
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer.hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_token_ids)
                # Our cache, not xgrammar's: one LRU, keyed by the spec, that prefetches share.
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS, cache_enabled=False)
                self._json_safe_row = _without_control_characters(info.decoded_vocab, self.vocab_size)
            return self._compiler

    def _json_safe(self) -> torch.Tensor:
        self._get_compiler()
        return self._json_safe_row


def _without_control_characters(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """A bitmask row allowing every token but those whose bytes hold a control character other than newline.
    xgrammar 0.2.9 lets a JSON string with minLength or maxLength hold raw control characters (a tab, \\x01),
    which JSON forbids (json.loads refuses them): so JSON-schema rows never sample them. Newline stays, for
    whitespace between elements, where the grammar allows it and strings do not; tabs and carriage returns are
    never needed there."""
    allowed = torch.ones(-(-vocab_size // 32) * 32, dtype=torch.bool)
    for token, text in enumerate(decoded_vocab[:vocab_size]):
        if any(b < 0x20 and b != 0x0A for b in text):
            allowed[token] = False
    weights = torch.tensor([_bit(i) for i in range(32)], dtype=torch.int64)
    return ((allowed.view(-1, 32).long() * weights).sum(dim=1)).to(torch.int32)


class GrammarState:
    """One sequence's matcher. It has seen the first num_seen output tokens: accepted while the grammar runs;
    once it has ended (EOS accepted), or a token it could not accept came (the sampler never gives one, unless
    every allowed token was masked by another stage, e.g. EOS held by min_tokens), only EOS is allowed.
    allowed: a bitmask row [ceil(V / 32)] int32 that every bitmask of this state is and-ed with, or None."""

    def __init__(self, grammar: Future, allowed=None):
        self.grammar = grammar
        self.allowed = allowed
        self.num_seen = 0
        self._matcher = None
        self.done = False              # ended, or broken: EOS only from now on

    @property
    def matcher(self):
        if self._matcher is None and not self.done:
            try:
                self._matcher = _xgrammar().GrammarMatcher(self.grammar.result())
            except ValueError as e:     # validated upstream; a worker's compile failing is a bug to see in the log
                log.error("%s: the sequence is ended", e)
                self.done = True
        return self._matcher

    def accept(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.num_seen += 1
            if not self.done and self.matcher is not None:
                self._accepted(token, self._matcher.accept_token(token))

    def _accepted(self, token: int, ok: bool) -> None:
        if not ok:
            log.warning("structured output: token %d is not allowed by the grammar; only EOS from now on", token)
            self.done = True
        elif self._matcher.is_terminated():
            self.done = True

    def copy(self) -> GrammarState:
        """A fresh matcher of the same grammar (a fork child: no output yet)."""
        return GrammarState(self.grammar, self.allowed)


def accept_batch(states: Sequence[GrammarState], tokens: Sequence[int]) -> None:
    """Each state accepts one token, in one call into xgrammar for those whose grammar still runs."""
    live = [(s, t) for s, t in zip(states, tokens) if not s.done and s.matcher is not None]
    for s in states:
        s.num_seen += 1
    if live:
        accepted = _xgrammar().BatchGrammarMatcher.batch_accept_token([s.matcher for s, _ in live],
                                                                      [t for _, t in live])
        for (state, token), ok in zip(live, accepted):
            state._accepted(token, ok)


_batch_matcher = None


def token_bitmask(states: Sequence[GrammarState], rows: Sequence[int], vocab_size: int,
                  eos_token_ids: Collection[int], device: torch.device) -> TokenBitmask:
    """The bitmask of the tokens each state allows next (rows: their rows in the sampler's batch), filled on
    the host (pinned, for a GPU) and on its way to the device without waiting: the sampler's stream takes it."""
    global _batch_matcher
    words = -(-vocab_size // 32)
    host = torch.empty((len(states), words), dtype=torch.int32, pin_memory=device.type == "cuda")
    live = [i for i, s in enumerate(states) if not s.done and s.matcher is not None]
    ended = [i for i, s in enumerate(states) if s.done]
    if ended:
        host[ended] = _eos_only(words, tuple(t for t in eos_token_ids if t < vocab_size))
    if live:
        if _batch_matcher is None:
            _batch_matcher = _xgrammar().BatchGrammarMatcher()
        _batch_matcher.batch_fill_next_token_bitmask([states[i].matcher for i in live], host, live)
        for allowed in {id(states[i].allowed): states[i].allowed for i in live
                        if states[i].allowed is not None}.values():
            host[[i for i in live if states[i].allowed is allowed]] &= allowed
    return TokenBitmask(to_device(rows, torch.int64, device), host.to(device, non_blocking=True))


@cache
def _eos_only(words: int, eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    row = torch.zeros(words, dtype=torch.int32)
    for t in eos_token_ids:
        row[t // 32] |= _bit(t % 32)
    return row


def _bit(i: int) -> int:
    """1 << i as an int32 value (bit 31 is the sign bit)."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i
