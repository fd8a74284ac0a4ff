"""The one output path: a completion's sampled tokens become what its client is sent, one token at a time: the text
that became final (cut at a stop string), and the finish reason.

LLMEngine (offline and streaming) and the detokenizer service both feed every token of every completion through a
CompletionState made by the OutputProcessor, so text, stop strings and finish reasons come out the same however a
request was served. The engine core ends sequences on EOS, stop token ids and length, and says so with the token;
a stop string can only be found here, in the text, so the caller must then stop the sequence upstream
(TokenOutput.stop_upstream).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from schemas.sampling_params import SamplingParams


@dataclass(slots=True)
class TokenOutput:
    """What one token adds to its completion."""
    token_id: int
    text: str                          # the text it made final: "" while UTF-8 bytes or a possible stop string wait
    finish_reason: str | None          # "stop" or "length" if the completion ends with this token
    stop_reason: int | str | None      # the stop token id or stop string that ended it
    stop_upstream: bool = False        # a stop string ended it, which the engine core cannot see: stop the sequence


class CompletionState:
    """One completion's output state: its incremental detokenizer (None without a tokenizer: then completions are
    token ids only). A completion takes no token after the one that finished it.

    defer_text: a completion without stop strings (nothing in its text can end it) has its tokens decoded only
    when its text is asked for (pending_text(), or the token that finishes it), all waiting tokens in one call. A
    caller that reads the text once, at the end (an offline batch), then decodes each completion once instead of
    once per token (on the Llama-3.2-1B shape the engine's report of a 256-row decode step took 1.0-1.4 ms decoding
    each token and 0.5-0.8 ms deferred, on the H200's host); one that reads it every step gets what it got before.
    The text is the same either way."""

    def __init__(self, detokenizer: IncrementalDetokenizer | None, defer_text: bool = False):
        self.detokenizer = detokenizer
        self.deferred: list[int] | None = [] if defer_text and detokenizer is not None and not detokenizer.stop \
            else None

    def add_token(self, token_id: int, finish_reason: str | None = None,
                  stop_reason: int | None = None) -> TokenOutput:
        """One sampled token, with the engine core's verdict on it: finish_reason "stop" (EOS, stop_reason the
        stop token id) or "length" when the token ended the sequence, else None."""
        d = self.detokenizer
        if d is None:
            return TokenOutput(token_id, "", finish_reason, stop_reason)
        if self.deferred is not None:
            self.deferred.append(token_id)
            if finish_reason is None:
                return TokenOutput(token_id, "", None, None)
            return TokenOutput(token_id, self.pending_text() + d.flush(), finish_reason, stop_reason)
        text = d.add([token_id])
        if d.stop_reason is not None:              # the text reached a stop string: that is why it ends
            return TokenOutput(token_id, text, "stop", d.stop_reason, stop_upstream=finish_reason is None)
        if finish_reason is not None:              # what was held back for a stop string that never came is final
            text += d.flush()
        return TokenOutput(token_id, text, finish_reason, stop_reason)

    def pending_text(self) -> str:
        """The text of the deferred tokens, decoded now ("" when none wait)."""
        if not self.deferred:
            return ""
        tokens, self.deferred = self.deferred, []
        return self.detokenizer.add(tokens)

    @property
    def released(self) -> int:
        """Characters of text handed out so far (the detokenizer service checkpoints it)."""
        return self.detokenizer.released if self.detokenizer is not None else 0

    def restore(self, token_ids: list[int], released: int) -> None:
        """Rebuild from a checkpoint: the tokens so far (none of which finished the completion), of which
        `released` characters of text were already sent."""
        if self.detokenizer is not None:
            self.detokenizer.add(token_ids)
            self.detokenizer.released = released


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def new_completion(self, prompt_token_ids: list[int], params: SamplingParams,
                       defer_text: bool = False) -> CompletionState:
        """prompt_token_ids: the prompt, or at least its last tokens (the first output token decodes in their
        context: see engine.detokenizer). defer_text: see CompletionState."""
        if self.tokenizer is None:
            return CompletionState(None)
        return CompletionState(IncrementalDetokenizer(self.tokenizer.backend, prompt_token_ids, params), defer_text)
