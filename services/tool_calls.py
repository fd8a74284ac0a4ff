"""Tool calls in a model's output: the formats models write them in, parsed out of the text (as it streams or
whole), and the grammar that makes a model call a tool when the request demands one.

    parser = TOOL_CALL_PARSERS["hermes"]                  # --tool-call-parser
    extractor = ToolCallExtractor(parser)                 # one per choice
    events = extractor.feed(text) + extractor.finish()    # [Content(text) | ToolCall(name, arguments), ...]
    spec = forced_tool_calls(parser, tools, name, parallel)   # tool_choice "required" or named: the constraint

The formats (vLLM's parsers of the same names):
    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, text around them (Qwen)
    llama3_json  {"name": ..., "parameters": {...}}, the whole output, several separated by ";"
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] after any text

Text that starts like a call but does not parse as one (malformed JSON, no name) stays content, as written.
Pure functions of the text: the response builder replays a stream through them deterministically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from schemas.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str           # JSON text


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model family writes its calls. `start` opens a call block; `end` closes one (None: the block runs
    to the end of the output); `only_at_start`: a block only where the output begins (after whitespace)."""
    name: str
    start: str
    end: str | None
    arguments_key: str                 # "arguments" or "parameters"
    call_open: str                     # what the grammar writes before each call's JSON object...
    call_separator: str                # ...between calls...
    call_close: str                    # ...and after the last
    only_at_start: bool = False
    start_is_special: bool = False     # start is a special token, which the detokenizer must not skip

    def parse_block(self, body: str) -> list[ToolCall] | None:
        """The calls in one block's text (between start and end), or None if it is not a well-formed block."""
        text = body.strip()
        if self.name == "mistral":
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return None
            values = value if isinstance(value, list) else [value]
        else:
            values = _json_values(text, ";" if self.name == "llama3_json" else "")
        if not values:
            return None
        calls = [self._call(v) for v in values]
        return None if any(c is None for c in calls) else calls

    def _call(self, value) -> ToolCall | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get(self.arguments_key, value.get("arguments", value.get("parameters", {})))
        if isinstance(arguments, str):          # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str, separator: str) -> list | None:
    """The JSON values in text, one after another (with `separator` between them, where given); None if anything
    else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        while i < len(text) and (text[i].isspace() or (separator and text[i] == separator)):
            i += 1
    return values


TOOL_CALL_PARSERS = {
    "hermes": ToolCallFormat("hermes", "<tool_call>", "</tool_call>", "arguments",
                             call_open="<tool_call>\n", call_separator="\n", call_close="\n</tool_call>"),
    "llama3_json": ToolCallFormat("llama3_json", "{", None, "parameters", only_at_start=True,
                                  call_open="", call_separator="; ", call_close=""),
    "mistral": ToolCallFormat("mistral", "[TOOL_CALLS]", None, "arguments", start_is_special=True,
                              call_open="", call_separator=", ", call_close=""),
}


class ToolCallExtractor:
    """Splits one choice's text, fed piece by piece, into content and tool calls. Content is released as soon as
    it cannot be the start of a call; a call is released whole, once its block ends (or the output does).
    Whitespace that only separates calls from each other or from the ends of the output (the newline between
    two calls) is layout, not content: it is held back until text follows it, and dropped if none does."""

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self._pending = ""             # text not released yet: a possible start marker, or an open block
        self._in_block = False
        self._seen_text = False        # only_at_start formats: whether anything but whitespace came before
        self._space = ""               # whitespace held back: content if text follows, dropped if a call does
        self._after_call = False       # the whitespace that follows a call is dropped too
        self._released = False         # whether any content was released
        self.num_calls = 0

    def feed(self, text: str) -> list[Content | ToolCall]:
        self._pending += text
        events: list[Content | ToolCall] = []
        while True:
            if self._in_block:
                if self.fmt.end is None:
                    return events
                close = self._pending.find(self.fmt.end)
                if close < 0:
                    return events
                block, self._pending = self._pending[:close + len(self.fmt.end)], self._pending[close + len(self.fmt.end):]
                self._in_block = False
                events += self._block(block)
                continue
            if self.fmt.only_at_start and self._seen_text:
                events += self._content(self._pending)
                self._pending = ""
                return events
            if self.fmt.only_at_start:
                stripped = self._pending.lstrip()
                if not stripped:
                    return events
                if stripped.startswith(self.fmt.start):
                    self._in_block = True
                    continue
                self._seen_text = True
                continue
            start = self._pending.find(self.fmt.start)
            if start >= 0:
                events += self._content(self._pending[:start])
                self._pending = self._pending[start:]
                self._in_block = True
                continue
            keep = marker_prefix_len(self._pending, self.fmt.start)
            events += self._content(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            return events

    def finish(self) -> list[Content | ToolCall]:
        """The rest, at the end of the output: an open block parsed (or left as content), held-back text released."""
        rest, self._pending = self._pending, ""
        if self._in_block:
            self._in_block = False
            return self._block(rest)
        return self._content(rest, final=True)

    def _block(self, block: str) -> list[Content | ToolCall]:
        body = block[len(self.fmt.start):] if self.fmt.start != "{" else block.lstrip()
        if self.fmt.end is not None and body.endswith(self.fmt.end):
            body = body[:-len(self.fmt.end)]
        calls = self.fmt.parse_block(body)
        if calls is None:
            return self._content(block)
        self.num_calls += len(calls)
        if not self._released:
            self._space = ""
        self._after_call = True
        return list(calls)

    def _content(self, text: str, final: bool = False) -> list[Content | ToolCall]:
        if text.strip():
            self._seen_text = True
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        if text:
            text, self._space = self._space + text, ""
            if not final:
                kept = text.rstrip()
                text, self._space = kept, text[len(kept):]
        elif final and not self.num_calls:
            text, self._space = self._space, ""
        self._released = self._released or bool(text)
        return [Content(text)] if text else []


def marker_prefix_len(text: str, marker: str) -> int:
    """The length of the longest end of text that begins marker (text that may yet become it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# Whitespace characters between two JSON elements of the arguments: unbounded, a sampled call can run on in
# whitespace until max_tokens cuts it.
MAX_WHITESPACE = 2


def forced_tool_calls(fmt: ToolCallFormat, tools: list[dict], name: str | None,
                      parallel: bool) -> StructuredOutputsParams:
    """The constraint for tool_choice "required" (name None: any of the tools, one or more calls unless not
    parallel) or a named function (exactly one call of it): xgrammar's structural tag for the calls, written in
    fmt's own format, each call's arguments held to its function's parameters schema."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    tags = [{"type": "tag",
             "begin": fmt.call_open + "{" + f'"name": {json.dumps(f["name"])}, "{fmt.arguments_key}": ',
             "content": {"type": "json_schema", "json_schema": f.get("parameters") or {"type": "object"},
                         "max_whitespace_cnt": MAX_WHITESPACE},
             "end": "}" + fmt.call_close}
            for f in functions]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": fmt.call_separator, "at_least_one": True,
             "stop_after_first": name is not None or not parallel}
    if fmt.name == "mistral":
        calls = {"type": "sequence", "elements": [{"type": "const_string", "value": "[TOOL_CALLS]["}, calls,
                                                  {"type": "const_string", "value": "]"}]}
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": calls})
