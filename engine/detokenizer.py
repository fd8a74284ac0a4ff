"""Incremental detokenization with stop strings, one instance per sequence.

Text is released as soon as it is final: bytes of an incomplete UTF-8 character are held back (DecodeStream does
that), and so is a tail that could still grow into a stop string. When a stop string appears, the text is cut
before it (or after it, with include_stop_str_in_output) and `stop_reason` says which one hit.
"""
from __future__ import annotations

from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

from schemas.sampling_params import SamplingParams

# Prompt tokens fed as context, so the first output token decodes as it would inside the whole text
# (a leading space, for instance, depends on what precedes it).
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: RustTokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]),
                                   skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.text = ""                      # all output text so far (cut at a stop string)
        self.released = 0                   # characters of text handed out
        self.stop_reason: str | None = None

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that became final. Several tokens go through the stream in one call
        (the text is the same as one at a time, for a fraction of the cost); a stop string is found wherever in
        their text it completes."""
        if self.stop_reason is None and token_ids:
            # (a list of one costs the binding about half a microsecond more than the id alone)
            chunk = self.stream.step(self.tokenizer, token_ids if len(token_ids) > 1 else token_ids[0])
            if chunk:
                checked = len(self.text)
                self.text += chunk
                if self.stop:
                    self._find_stop(checked)
        end = len(self.text)
        if self.stop and self.stop_reason is None:
            end -= self._partial_stop_len()
        return self._release(end)

    def flush(self) -> str:
        """The sequence ended for another reason: whatever was held back for a possible stop string is final."""
        return self._release(len(self.text))

    def _find_stop(self, checked: int) -> bool:
        # Only text that could contain a new match: from max_len - 1 characters before the new chunk.
        window = max(0, checked - max(map(len, self.stop)) + 1)
        hits = [(self.text.find(s, window), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        self.stop_reason = s
        return True

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        delta, self.released = self.text[self.released:end], end
        return delta
