"""Reasoning split from the answer on texts: each parser's format, whole and in any pieces, and the response
builder's message and stream shapes (with tool calls after the thinking too)."""
from __future__ import annotations

import json
import random

import pytest

from schemas.messages import ReplyItem
from services.openai_protocol import Limits, ResponseBuilder, TokenText, parse_chat
from services.reasoning import REASONING_PARSERS, ReasoningExtractor

# (format, text, reasoning, content), as a plain reading of the format splits it
CASES = [
    ("qwen3", "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "\nLet me think.\n", "The answer is 4."),
    ("qwen3", "  <think>a < b</think>done", "a < b", "done"),
    ("qwen3", "No thinking here <think>x</think>", "", "No thinking here <think>x</think>"),
    ("qwen3", "<think>cut before the end", "cut before the end", ""),
    ("qwen3", "<thin", "", "<thin"),
    ("qwen3", "", "", ""),
    ("deepseek_r1", "First, 2+2.</think>\n4", "First, 2+2.", "4"),
    ("deepseek_r1", "<think>First.</think>Then.", "First.", "Then."),
    ("deepseek_r1", "still thinking <", "still thinking <", ""),
]


@pytest.mark.parametrize("fmt,text,reasoning,content", CASES)
def test_split_whole_and_in_pieces(fmt, text, reasoning, content):
    rng = random.Random(0)
    for size in (len(text) or 1, 1, 2, 3, None):
        pieces, i = [], 0
        while i < len(text):
            n = size or rng.randint(1, 5)
            pieces.append(text[i:i + n])
            i += n
        extractor = ReasoningExtractor(REASONING_PARSERS[fmt])
        parts = [extractor.feed(p) for p in pieces] + [extractor.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (reasoning, content)


def items(text: str) -> list[ReplyItem]:
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    return [ReplyItem(request_id="r", index=0, seq=i, text=p, token_ids=[1],
                      finish_reason="stop" if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("tools", [False, True])
def test_builder_message_and_stream(tools):
    text = "<think>Weigh it.</think>\n\nCalling." + ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
                                                    if tools else "")
    body = {"messages": [{"role": "user", "content": "hi"}], **({"tools": [TOOL]} if tools else {})}
    limits = Limits("m", reasoning_parser="qwen3")
    whole = ResponseBuilder(parse_chat(body, limits), "chatcmpl-r", 0, TokenText())
    for item in items(text):
        whole.add_chunks(0, item)
    message = whole.response()["choices"][0]["message"]
    assert message["reasoning_content"] == "Weigh it." and message["content"] == "Calling."
    assert ("tool_calls" in message) == tools
    streamed = ResponseBuilder(parse_chat({**body, "stream": True}, limits), "chatcmpl-r", 0, TokenText())
    deltas = [c["choices"][0]["delta"] for item in items(text) for c in streamed.add_chunks(0, item)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Weigh it."
    assert "".join(d.get("content", "") for d in deltas) == "Calling."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    if tools:
        assert calls[0]["function"]["name"] == "f" and json.loads(calls[1]["function"]["arguments"]) == {"x": 1}
    # Without a reasoning parser, the thinking stays in the content.
    plain = ResponseBuilder(parse_chat(body, Limits("m")), "chatcmpl-r", 0, TokenText())
    for item in items(text):
        plain.add_chunks(0, item)
    assert "reasoning_content" not in plain.response()["choices"][0]["message"]
    assert plain.response()["choices"][0]["message"]["content"] is None or "<think>" in \
        plain.response()["choices"][0]["message"]["content"]
