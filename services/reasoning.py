"""A reasoning model's thinking, split from its answer: the text inside <think>...</think> goes to the message's
reasoning_content (delta.reasoning_content when streaming), the rest to its content.

    extractor = ReasoningExtractor(REASONING_PARSERS["qwen3"])      # --reasoning-parser; one per choice
    reasoning, content = extractor.feed(text)                       # as the text streams
    reasoning, content = extractor.finish()                         # at its end: what was held back

The formats (vLLM's parsers of the same names):
    qwen3        a think block where the output begins with one; an output without one is all content
    deepseek_r1  the template opens the block in the prompt: the output is reasoning up to </think> (a leading
                 <think> is skipped), and all reasoning if it never closes
"""
from __future__ import annotations

from dataclasses import dataclass

from services.tool_calls import marker_prefix_len


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    opened_by_prompt: bool = False       # the output starts inside the block


REASONING_PARSERS = {
    "qwen3": ReasoningFormat("qwen3"),
    "deepseek_r1": ReasoningFormat("deepseek_r1", opened_by_prompt=True),
}

_BEFORE, _INSIDE, _AFTER = "before", "inside", "after"      # where the output is, relative to the block


class ReasoningExtractor:
    """One choice's text, fed piece by piece, as (reasoning, content) pieces. Text that may be the start of a
    marker is held back until it is or is not one. The newlines after </think> separate, they are not content."""

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        self._state = _BEFORE
        self._pending = ""
        self._strip_newlines = False             # right after </think>

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning = content = ""
        while self._pending:
            if self._state == _AFTER:
                if self._strip_newlines:
                    self._pending = self._pending.lstrip("\n")
                    self._strip_newlines = not self._pending
                content, self._pending = content + self._pending, ""
            elif self._state == _BEFORE:
                stripped = self._pending.lstrip()
                if stripped.startswith(self.fmt.start):
                    self._pending, self._state = stripped[len(self.fmt.start):], _INSIDE
                elif not stripped or self.fmt.start.startswith(stripped):
                    break                              # may still become <think>
                else:                                  # no <think>: content, or (opened by the prompt) reasoning
                    self._state = _INSIDE if self.fmt.opened_by_prompt else _AFTER
            else:
                end = self._pending.find(self.fmt.end)
                if end >= 0:
                    reasoning += self._pending[:end]
                    self._pending = self._pending[end + len(self.fmt.end):]
                    self._state, self._strip_newlines = _AFTER, True
                    continue
                keep = marker_prefix_len(self._pending, self.fmt.end)
                reasoning += self._pending[:len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep:]
                break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self._pending = self._pending, ""
        if self._state == _INSIDE or (self._state == _BEFORE and self.fmt.opened_by_prompt):
            return rest, ""
        return "", rest
