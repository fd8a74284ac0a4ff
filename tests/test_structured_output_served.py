"""Structured output through the whole pipeline: `pagestream serve` (real redis-server, the default model, k=8
decode steps per plan) and the official openai client. Every sampled completion (temperature 1) must parse and
validate against its schema, and end by itself: one cut by max_tokens fails."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import start_stack, stop_stack

MODEL = "smollm2-135m-instruct"
N = 20                                  # sampled completions of each constraint
ASK = [{"role": "user", "content": "Reply with a JSON object."}]

SCHEMAS = {
    "nested objects": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "address"]},
    "arrays and enums": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["colors", "size"]},
    "bounded numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["age", "count", "ratio"]},
    "patterns and optional fields": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 8}},
        "required": ["code", "ok"]},
    "array of objects": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": {"type": "string", "maxLength": 8}},
        "required": ["id", "tag"]}, "minItems": 1, "maxItems": 3},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("structured"), "--kv-cache-memory-gb", "0.5", "--max-n", str(N), grpc=False)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=600)


def assert_all_valid(choices, schema: dict) -> None:
    assert len(choices) == N
    for choice in choices:
        text = choice.message.content if hasattr(choice, "message") else choice.text
        assert choice.finish_reason == "stop", f"cut by max_tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_sampled_completions_follow_every_schema(client):
    """Each schema on its own request of n=20 at temperature 1, all at once: one batch of constrained rows.
    Two ways in: response_format json_schema (chat; whitespace free) and vLLM's structured_outputs
    (completions; compact JSON)."""
    def chat(item):
        i, (name, schema) = item
        return client.chat.completions.create(
            model=MODEL, messages=ASK, n=N, temperature=1.0, seed=i, max_tokens=300,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                    "strict": True}})

    def completion(item):
        i, (name, schema) = item
        return client.completions.create(
            model=MODEL, prompt="A JSON object:", n=N, temperature=1.0, seed=i, max_tokens=200,
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})

    items = list(enumerate(SCHEMAS.items()))
    with ThreadPoolExecutor(len(items) + 1) as pool:
        chats = pool.map(chat, items)
        completions = pool.map(completion, items[:1])
        chats, completions = list(chats), list(completions)
    for response, schema in zip(chats, SCHEMAS.values()):
        assert_all_valid(response.choices, schema)
    for response, schema in zip(completions, SCHEMAS.values()):
        assert_all_valid(response.choices, schema)
        assert all("\n" not in c.text for c in response.choices)


def test_regex_choice_and_json_object(client):
    with ThreadPoolExecutor(4) as pool:
        regex = pool.submit(client.completions.create, model=MODEL, prompt="My phone number is", n=N,
                            temperature=1.0, max_tokens=20, extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
        choice = pool.submit(client.chat.completions.create, model=MODEL, n=N, temperature=1.0, max_tokens=20,
                             messages=[{"role": "user", "content": "Is water wet?"}],
                             extra_body={"structured_outputs": {"choice": ["yes", "no", "it depends"]}})
        legacy = pool.submit(client.completions.create, model=MODEL, prompt="Pick one:", n=N, temperature=1.0,
                             max_tokens=20, extra_body={"guided_choice": ["left", "right"]})
        # Any JSON object has no bound on its length: greedy, on a question with a short answer.
        streamed = pool.submit(lambda: list(client.chat.completions.create(
            model=MODEL, temperature=0.0, max_tokens=60, stream=True, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": 'Reply with a JSON object with one key "ok" set to true.'}])))
    for c in regex.result().choices:
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c.text) and c.finish_reason == "stop", c.text
    assert {c.message.content for c in choice.result().choices} <= {"yes", "no", "it depends"}
    assert {c.text for c in legacy.result().choices} <= {"left", "right"}
    chunks = streamed.result()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


class Pet(BaseModel):
    name: str = Field(max_length=10)
    species: str = Field(pattern="^(cat|dog|bird)$")
    age: int = Field(ge=0, le=30)


def test_beta_parse_returns_the_pydantic_object(client):
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
        temperature=1.0, seed=3, max_tokens=200)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.species in ("cat", "dog", "bird") and 0 <= pet.age <= 30


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     'Unsupported type "strin"'),
    ({"extra_body": {"guided_regex": "(ab"}}, "parenthesis is not closed"),
    ({"extra_body": {"guided_grammar": "root ::= foo"}}, 'Rule "foo" is not defined'),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "only one structured output constraint"),
])
def test_a_spec_that_cannot_compile_is_a_400_and_the_server_goes_on(client, body, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **body)
    assert message in e.value.message
    after = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert after.choices[0].finish_reason == "length"


def test_free_requests_give_their_greedy_text_beside_constrained_ones(client):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]

    def free(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, temperature=0.0, max_tokens=16).choices[0].text

    alone = [free(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(client.chat.completions.create, model=MODEL, messages=ASK, n=4,
                                   temperature=1.0, max_tokens=300, response_format={
                                       "type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
                       for schema in list(SCHEMAS.values())[:2]]
        beside = list(pool.map(free, prompts))
        for future, schema in zip(constrained, SCHEMAS.values()):
            for c in future.result().choices:
                assert c.finish_reason == "stop"
                jsonschema.validate(json.loads(c.message.content), schema)
    assert beside == alone
