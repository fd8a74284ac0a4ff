"""The whole pipeline, for real: `pagestream serve` (its own redis-server, 3 tokenizers, 2 detokenizers, the
default model) driven with the official openai client and plain HTTP."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from engine import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Roses are red,", "Water boils at",
           "The three primary colors are", "Once upon a time"]
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What color is the sky?"]


def greedy(max_tokens=24) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


# ---- the openai client gets exactly the offline engine's greedy text ------------------------------------------
def test_completions_equal_offline_engine(client, offline):
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, greedy())]
    for prompt, want in zip(PROMPTS, expected):
        r = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.completion_tokens == len(offline.tokenizer.encode(want)) or r.choices[0].finish_reason
        streamed = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=24,
                                             temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_chat_equals_offline_engine(client, offline):
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        want = offline.chat(messages, greedy(40))[0].outputs[0]
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=40,
                                           temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                     max_tokens=40, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_n_stop_and_logprobs(client):
    r = client.completions.create(model="smollm2-135m-instruct", prompt="Roses are red,", max_tokens=16,
                                  temperature=0.9, n=3, seed=5, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) > 0
        assert all(len(top) <= 3 for top in c.logprobs.top_logprobs)     # top 2, plus the sampled token
    full = client.completions.create(model="smollm2-135m-instruct", prompt="Roses are red,", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = full.split()[2]
    cut = client.completions.create(model="smollm2-135m-instruct", prompt="Roses are red,", max_tokens=24,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


# ---- load and faults -------------------------------------------------------------------------------------------
async def stream_all(stack, prompts: list[str], max_tokens: int = 16) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0,
                                timeout=600, http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=500)))

    async def one(prompt: str) -> str:
        text = ""
        async for chunk in await client.completions.create(model="smollm2-135m-instruct", prompt=prompt,
                                                           max_tokens=max_tokens, temperature=0, stream=True,
                                                           extra_body={"ignore_eos": True}):
            if chunk.choices:
                text += chunk.choices[0].text
        return text

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def load_prompts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i * 7 % 13}? Answer:" for i in range(n)]


def test_200_concurrent_streams_survive_killed_tokenizer_and_detokenizer(serve_stack):
    prompts = load_prompts(200)
    undisturbed = asyncio.run(stream_all(serve_stack, prompts))
    assert all(undisturbed)

    async def disturbed():
        run = asyncio.create_task(stream_all(serve_stack, prompts))
        await asyncio.sleep(1.0)                      # requests are in every stage by now
        assert serve_stack.kill("tokenizer") and serve_stack.kill("detokenizer")
        return await run

    assert asyncio.run(disturbed()) == undisturbed    # nothing lost, nothing doubled, same text
    assert "took partition" in serve_stack.log()


def test_metrics_parse_and_show_the_pipeline(serve_stack, client):
    client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4)
    names = {name for name, _ in serve_stack.metrics()}
    assert serve_stack.metric("pagestream_time_to_first_token_seconds_count") >= 1
    assert serve_stack.metric("pagestream_kv_blocks_capacity") > 0
    assert {"pagestream_kv_cache_usage_ratio", "pagestream_num_requests_running",
            "pagestream_stream_lag_seconds"} <= names


def test_disconnect_frees_kv_blocks(serve_stack):
    def used() -> float:
        return serve_stack.metric("pagestream_kv_blocks_used")

    deadline = time.monotonic() + 5                        # stats refresh every half second
    while used() > 0:
        assert time.monotonic() < deadline, "blocks held before the test began"
        time.sleep(0.1)
    body = {"model": "smollm2-135m-instruct", "prompt": "Tell me a very long story.", "max_tokens": 1500,
            "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {serve_stack.api_key}"}
    with httpx.stream("POST", f"{serve_stack.base_url}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        for i, _ in enumerate(response.iter_lines()):
            if i > 10:
                break                                      # walk away mid-stream (1,500 tokens take minutes here)
    time.sleep(1.0)                                        # the stats have been published since
    deadline = time.monotonic() + 5
    while used() > 0:
        assert time.monotonic() < deadline, "the disconnected request still holds KV blocks"
        time.sleep(0.1)


# ---- bad input: the right 4xx, an OpenAI error body, and the server keeps serving ------------------------------
def post(stack, path: str, body: bytes | dict, key: str | None = "default", **headers) -> httpx.Response:
    key = stack.api_key if key == "default" else key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.base_url}{path}", content=content,
                      headers={"content-type": "application/json", **headers}, timeout=60)


BAD = [
    ("malformed json", "/v1/completions", b'{"model": "x", "prompt": ', 400),
    ("wrong type", "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": "ten"}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404),
    ("empty messages", "/v1/chat/completions", {"model": "smollm2-135m-instruct", "messages": []}, 400),
    ("prompt too long", "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "hello " * 3000}, 400),
    ("max_tokens 0", "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 0}, 400),
    ("n too large", "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "hi", "n": 1000}, 400),
    ("invalid utf-8", "/v1/completions", b'{"model": "smollm2-135m-instruct", "prompt": "\xff\xfe"}', 400),
    ("oversized body", "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(serve_stack, client, name, path, body, status):
    r = post(serve_stack, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and "type" in error
    ok = client.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_wrong_or_missing_api_key_is_401(serve_stack):
    for key in ("wrong-key", None):
        r = post(serve_stack, "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "hi"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["message"]


# ---- dummy weights with a real tokenizer -----------------------------------------------------------------------
def test_dummy_weights_with_a_tokenizer_serve_text(tmp_path):
    """`serve --load-format dummy --tokenizer smollm2-135m-instruct` (a tiny shape here): every service loads the
    tokenizer it is given, so text prompts work, and the served text is the offline engine's on the same weights."""
    from transformers import LlamaConfig

    from conftest import TINY, start_stack, stop_stack

    shape = tmp_path / "shape"
    LlamaConfig(**{**TINY, "max_position_embeddings": 2048}).save_pretrained(shape)
    offline = LLM(str(shape), load_format="dummy", tokenizer="smollm2-135m-instruct", progress=False)
    want = offline.generate("Hello", greedy(8))[0]
    stack = start_stack(tmp_path, "--model", str(shape), "--load-format", "dummy", "--tokenizer",
                        "smollm2-135m-instruct", api_key=None)
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model=str(shape), prompt="Hello", max_tokens=8, temperature=0, logprobs=0)
        assert r.choices[0].text == want.outputs[0].text and r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert not any(t.startswith("token_id:") for t in r.choices[0].logprobs.tokens)   # the gateway's too
    finally:
        stop_stack(stack)
