"""A constraint on a completion's text (structured output), as vLLM's StructuredOutputsParams spells it.

    SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))
    StructuredOutputsParams(regex=r"\\d{3}-\\d{4}"), (choice=["yes", "no"]), (grammar=EBNF), (json_object=True)
    StructuredOutputsParams(structural_tag=...)  # xgrammar's structural tag, as JSON text: tool calling's way in

Exactly one constraint. Part of the wire contract (it travels inside SamplingParams, from the gateway to the
worker), so it is plain data: the JSON schema travels as JSON text, which is also what identifies a grammar
(key(): the worker and the tokenizer compile each spec once and cache it by that key). Whether a spec compiles is
the grammar compiler's to say (engine/structured_output.py, run by the tokenizer service and LLMEngine): here
only its shape is checked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_CHOICES = 1024


@dataclass
class StructuredOutputsParams:
    json: str | None = None                # a JSON schema, as JSON text (a dict is accepted and turned into text)
    regex: str | None = None
    choice: list[str] | None = None        # the completion is exactly one of these strings
    grammar: str | None = None             # EBNF (GBNF-style, as xgrammar reads it); the start rule is root
    json_object: bool = False              # any JSON object or array (OpenAI's response_format json_object)
    structural_tag: str | None = None      # xgrammar's structural tag, as JSON text (tool calls: free text with
                                           # constrained segments between trigger tags)
    disable_any_whitespace: bool = False   # JSON: no whitespace beyond one space after ':' and ','

    def __post_init__(self) -> None:
        # JSON in one canonical text (the cache key): a schema sent as an object or as text, spaced or not, is one
        # grammar. Key order is kept: a schema's property order is the order the completion writes them in.
        self.json = _canonical(self.json, "json")
        self.structural_tag = _canonical(self.structural_tag, "structural_tag")
        if self.choice is not None:
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        """Which constraint: json, regex, choice, grammar, json_object or structural_tag."""
        return next(name for name in _KINDS if _given(getattr(self, name)))

    def key(self) -> tuple:
        """What identifies the compiled grammar: the constraint, its text, and the whitespace rule."""
        value = self.kind
        spec = getattr(self, value)
        return (value, tuple(spec) if isinstance(spec, list) else spec, self.disable_any_whitespace)

    def validate(self) -> None:
        given = [name for name in _KINDS if _given(getattr(self, name))]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one constraint (json, regex, choice, grammar, "
                             f"json_object or structural_tag), got {', '.join(given) or 'none'}")
        for name in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured outputs: {name} must be a string, got {type(value).__name__}")
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured outputs: json_object and disable_any_whitespace must be booleans")
        for name in ("json", "structural_tag"):
            if getattr(self, name) is not None:
                _canonical(getattr(self, name), name)
        if self.choice is not None:
            if not 1 <= len(self.choice) <= MAX_CHOICES or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured outputs: choice must be a list of 1 to {MAX_CHOICES} non-empty "
                                 "strings")


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _canonical(value: Any, name: str) -> Any:
    """A JSON object (or its text) as compact JSON text; anything else as it is, for validate() to refuse."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"structured outputs: {name} is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError(f"structured outputs: {name} must be a JSON object")
    if isinstance(value, (dict, bool)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


def _given(value: Any) -> bool:
    return value is not None and value is not False
