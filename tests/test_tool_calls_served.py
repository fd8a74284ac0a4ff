"""Tool calling through the whole pipeline: `pagestream serve` (real redis-server, the default model) and the
official openai client. tool_choice "required" and a named function must always give calls that parse and whose
arguments validate against their function's schema (sampled at temperature 1, streaming and not); a follow-up
with the tool's result reaches the model's prompt; bad tools are 400s. The same stack splits reasoning
(--reasoning-parser qwen3): a think block forced by a regex comes back as reasoning_content."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from conftest import start_stack, stop_stack
from engine.tokenizer import load_tokenizer
from engine.model_files import resolve_model

MODEL = "smollm2-135m-instruct"
N = 2
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["What is the weather like in Paris?", "What is 17 plus 25?", "Tell me a joke."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("tools"), "--kv-cache-memory-gb", "0.5", "--reasoning-parser", "qwen3",
                    grpc=False)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=300)


def assert_valid_calls(calls, names) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def ask(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def test_required_always_calls(client):
    for i, prompt in enumerate(PROMPTS):
        r = client.chat.completions.create(model=MODEL, messages=ask(prompt), tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, n=N, temperature=1.0, seed=i, max_tokens=80)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls", choice.message
            assert len(choice.message.tool_calls) == 1
            assert_valid_calls(choice.message.tool_calls, SCHEMAS)
            assert choice.message.content is None


def test_required_parallel_calls(client):
    """Parallel calls: one or more, each valid; the model may go on calling until max_tokens cuts the last one
    (finish_reason length: the cut call is not a call)."""
    r = client.chat.completions.create(model=MODEL, messages=ask(PROMPTS[1]), tools=TOOLS, tool_choice="required",
                                       n=N, temperature=1.0, seed=5, max_tokens=80)
    for choice in r.choices:
        assert_valid_calls(choice.message.tool_calls, SCHEMAS)
        if choice.finish_reason == "tool_calls":
            assert choice.message.content is None
        else:
            assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith("<tool_call>")


def collect_stream(stream) -> dict[int, dict]:
    """Each choice's content, calls (assembled from their deltas as the openai docs do) and finish reason."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            acc = choices.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            acc["content"] += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.index not in acc["calls"]:           # a call's first delta: id, type, name, empty arguments
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    acc["calls"][d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                    acc["calls"][d.index]["arguments"] += d.function.arguments
            if c.finish_reason is not None:
                acc["finish"] = c.finish_reason
    return choices


def test_required_streaming_always_calls(client):
    for i, prompt in enumerate(PROMPTS):
        stream = client.chat.completions.create(model=MODEL, messages=ask(prompt), tools=TOOLS,
                                                tool_choice="required", parallel_tool_calls=False, n=N,
                                                temperature=1.0, seed=10 + i,
                                                max_tokens=80, stream=True)
        choices = collect_stream(stream)
        assert sorted(choices) == list(range(N))
        for acc in choices.values():
            assert acc["finish"] == "tool_calls" and acc["calls"] and not acc["content"].strip()
            assert sorted(acc["calls"]) == [0]
            for call in acc["calls"].values():
                assert call["id"].startswith("call_")
                jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_named_function_is_called(client):
    for i, prompt in enumerate(PROMPTS):
        r = client.chat.completions.create(model=MODEL, messages=ask(prompt), tools=TOOLS, n=N, temperature=1.0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           seed=20 + i, max_tokens=60)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls"
            assert len(choice.message.tool_calls) == 1
            assert_valid_calls(choice.message.tool_calls, {"add"})


def test_follow_up_with_the_tool_result(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(PROMPTS[0]), tools=TOOLS, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]}

    def follow_up(result: str):
        messages = ask(PROMPTS[0]) + [assistant, {"role": "tool", "tool_call_id": call.id, "content": result}]
        return messages, client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                                        max_tokens=8, temperature=0)

    short_messages, short = follow_up("18 degrees")
    _, longer = follow_up("18 degrees celsius, sunny, light wind from the west, no rain expected today")
    assert short.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert longer.usage.prompt_tokens > short.usage.prompt_tokens        # the tool's result is in the prompt
    # The reference: the prompt the model's own template makes of the same conversation.
    tokenizer = load_tokenizer(resolve_model(MODEL, progress=False))
    rendered = [dict(m) for m in short_messages]
    rendered[1] = {**assistant, "content": "", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}]}
    assert short.usage.prompt_tokens == len(tokenizer.encode_chat(rendered, tools=TOOLS))


def test_auto_and_none_answer(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=ask(PROMPTS[2]), tools=TOOLS, tool_choice=choice,
                                           max_tokens=16, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        if choice == "none":
            assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("kwargs", [
    {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": TOOLS, "tool_choice": "always"},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
     "tool_choice": "required"},
])
def test_bad_tools_are_400s(client, kwargs):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4, **kwargs)
    ok = client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2)     # still serving
    assert ok.choices[0].finish_reason == "length"


FUNCTIONS = [t["function"] for t in TOOLS]


def test_legacy_function_call_is_answered_in_its_shape(client):
    """An older client's functions / function_call: a named function_call is always called, and comes back as
    message.function_call (whole or as streamed deltas) with finish_reason function_call; a follow-up with the
    legacy turns (the call, then a "function" message) reaches the prompt as the tool-calling turns would."""
    kwargs = dict(model=MODEL, messages=ask(PROMPTS[0]), functions=FUNCTIONS, function_call={"name": "get_weather"},
                  n=N, temperature=1.0, max_tokens=80)
    r = client.chat.completions.create(seed=30, **kwargs)
    for choice in r.choices:
        assert choice.finish_reason == "function_call" and choice.message.tool_calls is None, choice.message
        assert choice.message.content is None and choice.message.function_call.name == "get_weather"
        jsonschema.validate(json.loads(choice.message.function_call.arguments), SCHEMAS["get_weather"])

    streamed = {}
    for chunk in client.chat.completions.create(seed=30, stream=True, **kwargs):
        for c in chunk.choices:
            acc = streamed.setdefault(c.index, {"name": None, "arguments": "", "finish": None})
            assert c.delta.tool_calls is None
            if c.delta.function_call is not None:
                if c.delta.function_call.name is not None:
                    assert acc["name"] is None                          # the name comes once, first
                    acc["name"] = c.delta.function_call.name
                acc["arguments"] += c.delta.function_call.arguments or ""
            acc["finish"] = c.finish_reason or acc["finish"]
    # The same seed samples the same calls, whole or streamed.
    assert streamed == {c.index: {"name": c.message.function_call.name, "arguments": c.message.function_call.arguments,
                                  "finish": "function_call"} for c in r.choices}

    call = r.choices[0].message.function_call
    legacy = ask(PROMPTS[0]) + [{"role": "assistant", "content": None,
                                 "function_call": {"name": call.name, "arguments": call.arguments}},
                                {"role": "function", "name": call.name, "content": "18 degrees"}]
    newer = ask(PROMPTS[0]) + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    old = client.chat.completions.create(model=MODEL, messages=legacy, functions=FUNCTIONS, max_tokens=6,
                                         temperature=0)
    new = client.chat.completions.create(model=MODEL, messages=newer, tools=TOOLS, max_tokens=6, temperature=0,
                                         parallel_tool_calls=False)
    assert old.usage.prompt_tokens == new.usage.prompt_tokens > r.usage.prompt_tokens
    assert old.choices[0].message.content == new.choices[0].message.content


@pytest.mark.parametrize("kwargs", [
    {"functions": FUNCTIONS, "tools": TOOLS},
    {"function_call": "auto"},
    {"functions": FUNCTIONS, "function_call": {"name": "nope"}},
    {"functions": [{"name": "bad name!"}]},
    {"functions": FUNCTIONS, "function_call": "required"},
])
def test_bad_legacy_functions_are_400s(client, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4, **kwargs)
    assert "function" in e.value.body["message"]
    ok = client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2)     # still serving
    assert ok.choices[0].finish_reason == "length"


THINK = r"<think>[a-z ]{1,16}</think>\n\n[A-Za-z ]{1,16}"


def test_reasoning_is_split_from_the_answer(client):
    """The regex makes the model think first; the answer must come back split, whole and streamed, and the two
    put together (as the plain reference) must be the text the regex allowed."""
    kwargs = dict(model=MODEL, messages=ask("Think, then answer: what color is the sky?"), temperature=1.0,
                  max_tokens=48, extra_body={"structured_outputs": {"regex": THINK}})
    r = client.chat.completions.create(seed=1, **kwargs)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(THINK, f"<think>{reasoning}</think>\n\n{message.content}")
    assert "<think>" not in message.content and reasoning
    stream = client.chat.completions.create(seed=1, stream=True, **kwargs)
    parts = {"reasoning_content": "", "content": ""}
    for chunk in stream:
        for c in chunk.choices:
            parts["content"] += c.delta.content or ""
            parts["reasoning_content"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
    assert parts == {"reasoning_content": reasoning, "content": message.content}      # same seed, same text
