"""Tool calls on texts: each parser's format (several calls, text around them, malformed JSON left as content),
the same events whether the text comes whole or token by token, the API's tool fields and their 400s, and the
response builder's message and stream shapes."""
from __future__ import annotations

import json
import random

import pytest

from schemas.messages import ReplyItem
from services.openai_protocol import Limits, ProtocolError, ResponseBuilder, TokenText, parse_chat
from services.tool_calls import TOOL_CALL_PARSERS, Content, ToolCall, ToolCallExtractor

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]

# (format, text, the content and calls a plain reading of the format finds)
CASES = [
    ("hermes", 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Sure.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
               '<tool_call>{"name": "b", "arguments": {"y": [1, 2]}}</tool_call> done',
     "done", [("a", {"x": 1}), ("b", {"y": [1, 2]})]),
    ("hermes", 'no calls here, just <tool text', "no calls here, just <tool text", []),
    ("hermes", ' a  b\n', " a  b\n", []),                # whitespace away from calls is content
    ("hermes", 'a\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nb <tool_call>', "a\n\nb <tool_call>",
     [("f", {})]),
    ("hermes", 'x <tool_call>{"name": "a", "arguments": {"x": </tool_call> y',
     'x <tool_call>{"name": "a", "arguments": {"x": </tool_call> y', []),             # malformed: content
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("hermes", 'cut <tool_call>{"name": "a", "arguments": {}}', "cut", [("a", {})]),  # unclosed, but whole JSON
    ("hermes", '<tool_call>{"name": "a", "arguments": "{\\"q\\": 2}"}</tool_call>', "", [("a", {"q": 2})]),
    ("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"z": true}}', "",
     [("a", {}), ("b", {"z": True})]),
    ("llama3_json", 'The answer is {"name": "a"}', 'The answer is {"name": "a"}', []),   # not at the start
    ("llama3_json", '{"name": "a", "parameters": {', '{"name": "a", "parameters": {', []),
    ("mistral", 'ok [TOOL_CALLS][{"name": "a", "arguments": {"k": "v"}}, {"name": "b", "arguments": {}}]',
     "ok", [("a", {"k": "v"}), ("b", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {]', '[TOOL_CALLS][{"name": "a", "arguments": {]', []),
]


def reference(events):
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls = [(e.name, json.loads(e.arguments)) for e in events if isinstance(e, ToolCall)]
    return content, calls


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parsers_whole_and_in_pieces(fmt, text, content, calls):
    whole = ToolCallExtractor(TOOL_CALL_PARSERS[fmt])
    assert reference(whole.feed(text) + whole.finish()) == (content, calls)
    rng = random.Random(0)
    for _ in range(5):            # any split into pieces (tokens) gives the same content and calls, in order
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            pieces.append(text[i:i + n])
            i += n
        streamed = ToolCallExtractor(TOOL_CALL_PARSERS[fmt])
        events = [e for p in pieces for e in streamed.feed(p)] + streamed.finish()
        assert reference(events) == (content, calls)
        assert streamed.num_calls == len(calls)


def parse(body: dict, parser: str = "hermes"):
    return parse_chat({"messages": ASK, **body}, Limits("m", tool_call_parser=parser))


@pytest.mark.parametrize("body,param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "string"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "unknown"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "18C"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
    # OpenAI's deprecated functions / function_call: with their newer forms, malformed, or naming no function.
    ({"functions": [WEATHER["function"]], "tools": [TIME]}, "functions"),
    ({"functions": [WEATHER["function"]], "tool_choice": "auto"}, "function_call"),
    ({"functions": [WEATHER["function"]], "parallel_tool_calls": True}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"functions": WEATHER["function"]}, "functions"),
    ({"functions": [{"name": "bad name"}]}, "functions"),
    ({"functions": [WEATHER["function"], WEATHER["function"]]}, "functions"),
    ({"functions": [WEATHER["function"]], "function_call": "required"}, "function_call"),
    ({"functions": [WEATHER["function"]], "function_call": {"name": "get_time"}}, "function_call"),
    ({"functions": [WEATHER["function"]], "function_call": {"type": "function", "name": "get_weather"}},
     "function_call"),
    ({"messages": ASK + [{"role": "function", "content": "18C"}]}, "messages[1].name"),
    ({"messages": ASK + [{"role": "function", "name": "get_weather", "content": "18C"}]}, "messages[1]"),
    ({"messages": [{"role": "user", "function_call": {"name": "f"}}]}, "messages[0].function_call"),
    ({"messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": {"x": 1}}}]},
     "messages[0].function_call"),
])
def test_bad_tool_fields_are_400s(body, param):
    with pytest.raises(ProtocolError) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param


def test_tool_choice_sets_the_constraint():
    auto = parse({"tools": [WEATHER, TIME]})
    assert auto.tool_format.name == "hermes" and auto.params.structured_outputs is None
    none = parse({"tools": [WEATHER], "tool_choice": "none"})
    assert none.tool_format is None and none.params.structured_outputs is None
    required = parse({"tools": [WEATHER, TIME], "tool_choice": "required"})
    tag = json.loads(required.params.structured_outputs.structural_tag)
    assert {t["begin"] for t in tag["format"]["tags"]} == {
        '<tool_call>\n{"name": "get_weather", "arguments": ', '<tool_call>\n{"name": "get_time", "arguments": '}
    named = parse({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    tag = json.loads(named.params.structured_outputs.structural_tag)["format"]
    assert [t["begin"] for t in tag["tags"]] == ['<tool_call>\n{"name": "get_time", "arguments": ']
    assert tag["stop_after_first"]
    # The tools travel to the tokenizer with the conversation; follow-up calls and results are kept.
    follow = parse({"tools": [WEATHER], "messages": ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]})
    (request,) = follow.generate_requests("r", 0.0)
    assert json.loads(request.tools) == [WEATHER]
    assert request.messages[1].tool_calls[0].arguments == '{"city": "Paris"}'
    assert request.messages[2].tool_call_id == "call_1"


def items(text: str, finish: str = "stop") -> list[ReplyItem]:
    """The text as the detokenizer sends it: a few characters an item, the last one finishing."""
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)] or [""]
    return [ReplyItem(request_id="r", index=0, seq=i, text=p, token_ids=[1],
                      finish_reason=finish if i == len(pieces) - 1 else None)
            for i, p in enumerate(pieces)]


TEXT = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' \
       '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def test_response_message_and_stream_agree():
    whole = ResponseBuilder(parse({"tools": [WEATHER, TIME]}), "chatcmpl-1", 0, TokenText())
    for item in items(TEXT):
        whole.add_chunks(0, item)
    choice = whole.response()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)

    streamed = ResponseBuilder(parse({"tools": [WEATHER, TIME], "stream": True}), "chatcmpl-1", 0, TokenText())
    chunks = [c for item in items(TEXT) for c in streamed.add_chunks(0, item)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Let me look."
    call_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    # OpenAI's shape: the first delta of a call has its index, id, type, name and empty arguments; then pieces.
    assert call_deltas[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    assert call_deltas[1] == {"index": 0, "function": {"arguments": calls[0]["function"]["arguments"]}}
    assert call_deltas[2]["index"] == 1 and call_deltas[2]["id"] == calls[1]["id"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_no_calls_and_tool_choice_none_keep_the_text():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    for body in ({"tools": [TIME], "tool_choice": "none"}, {}):
        builder = ResponseBuilder(parse(body), "chatcmpl-2", 0, TokenText())
        for item in items(text):
            builder.add_chunks(0, item)
        choice = builder.response()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == "stop"
    builder = ResponseBuilder(parse({"tools": [TIME]}), "chatcmpl-3", 0, TokenText())
    for item in items("plain answer"):
        builder.add_chunks(0, item)
    assert builder.response()["choices"][0]["message"] == {"role": "assistant", "content": "plain answer"}


def test_legacy_functions_are_tools():
    """functions / function_call make the request tools / tool_choice would (without parallel calls)."""
    for legacy, newer in [({"function_call": "auto"}, {"tool_choice": "auto", "parallel_tool_calls": False}),
                          ({}, {"parallel_tool_calls": False}),
                          ({"function_call": "none"}, {"tool_choice": "none"}),
                          ({"function_call": {"name": "get_time"}},
                           {"tool_choice": {"type": "function", "function": {"name": "get_time"}},
                            "parallel_tool_calls": False})]:
        old = parse({"functions": [WEATHER["function"], TIME["function"]], **legacy})
        new = parse({"tools": [WEATHER, TIME], **newer})
        assert old.legacy_functions and not new.legacy_functions
        assert (old.tools, old.tool_format, old.params) == (new.tools, new.tool_format, new.params)
    # The legacy turns of a follow-up: the call and the function's result, as a tool call and its answer.
    follow = parse({"functions": [WEATHER["function"]], "messages": ASK + [
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": "18C"}]})
    (request,) = follow.generate_requests("r", 0.0)
    assert json.loads(request.tools) == [{"type": "function", "function": WEATHER["function"]}]
    call = request.messages[1].tool_calls[0]
    assert (request.messages[1].role, call.name, call.arguments) == ("assistant", "get_weather", '{"city": "Paris"}')
    assert (request.messages[2].role, request.messages[2].tool_call_id, request.messages[2].content) == \
        ("tool", call.id, "18C")


def test_legacy_functions_answer_with_function_call():
    """One call, as message.function_call (or delta.function_call pieces), finish_reason function_call; a second
    call has no place in that shape and is dropped."""
    functions = {"functions": [WEATHER["function"], TIME["function"]]}
    whole = ResponseBuilder(parse(functions), "chatcmpl-4", 0, TokenText())
    for item in items(TEXT):
        whole.add_chunks(0, item)
    choice = whole.response()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"] == {"role": "assistant", "content": "Let me look.",
                                 "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

    streamed = ResponseBuilder(parse({**functions, "stream": True}), "chatcmpl-4", 0, TokenText())
    chunks = [c for item in items(TEXT) for c in streamed.add_chunks(0, item)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Let me look."
    assert [d["function_call"] for d in deltas if "function_call" in d] == [
        {"name": "get_weather", "arguments": ""}, {"arguments": '{"city": "Paris"}'}]
    assert not any("tool_calls" in d for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["function_call"]

    plain = ResponseBuilder(parse(functions), "chatcmpl-5", 0, TokenText())
    for item in items("no call"):
        plain.add_chunks(0, item)
    assert plain.response()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "no call"},
                                              "logprobs": None, "finish_reason": "stop", "stop_reason": None}
