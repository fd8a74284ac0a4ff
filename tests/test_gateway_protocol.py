"""The gateway without the pipeline: request parsing and validation (every bad input -> its status and an OpenAI
error body), response and stream-chunk shapes, logprobs, the metrics text, and aborting on disconnect (under a
real uvicorn). A scripted stand-in for PipelineClient replaces Redis and the services."""
from __future__ import annotations

import asyncio
import fnmatch
import json
import socket
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from schemas.messages import ErrorInfo, GenerateRequest, ReplyItem, TokenLogprobsWire
from services.gateway import GatewaySettings, build_app
from services.metrics import (Counter, Gauge, GatewayMetrics, Histogram, PipelineScraper, exposition,
                              scheduler_metrics, stream_metrics)
from services.openai_protocol import (Limits, ProtocolError, ResponseBuilder, TokenText, chat_logprobs,
                                      completion_logprobs, decode_json_body, parse_chat, parse_completion)
from services.pipeline_client import Overloaded, Unavailable
from services.transport import Names

MODEL = "test-model"
LIMITS = Limits(MODEL, max_n=4, max_model_len=1024)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


# ---- a scripted PipelineClient ---------------------------------------------------------------------------------
class Vocab:
    """A tokenizer stand-in: token id t is the text "<t>"."""

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(f"<{t}>" for t in token_ids)


def answer(request: GenerateRequest, pieces=("Hel", "lo"), finish="stop", prompt_tokens=3, cached=1):
    """Each completion of the request says the pieces, one token each, then finishes."""
    items = []
    for index in range(request.params.n):
        for seq, text in enumerate(pieces):
            token = 100 + 10 * index + seq
            logprobs = None
            if request.params.logprobs is not None:
                k = request.params.logprobs
                logprobs = [TokenLogprobsWire(-0.25, [token, 7, 8][:k], [-0.25, -1.5, -2.5][:k])]
            items.append(ReplyItem(request.request_id, index, seq, text, [token], logprobs,
                                   finish if seq == len(pieces) - 1 else None, None, prompt_tokens, cached))
    return items


class FakeRedis:
    """What PipelineScraper calls: SCAN and one pipeline of HGETALL / XINFO STREAM / XINFO GROUPS."""

    def __init__(self, stats: dict | None = None, streams: dict | None = None):
        self.stats = stats or {}
        self.streams = streams or {}          # name -> (XINFO STREAM, XINFO GROUPS)

    async def scan_iter(self, match, count, _type):
        for name in self.streams:
            if fnmatch.fnmatch(name, match):
                yield name.encode()

    def pipeline(self, transaction):
        return FakePipeline(self)

    async def smembers(self, key):
        return {b"w0"}                        # the workers' registry


class FakePipeline:
    def __init__(self, redis: FakeRedis):
        self.redis, self.results = redis, []

    def hgetall(self, key):
        self.results.append({k.encode(): v.encode() for k, v in self.redis.stats.items()})

    def xinfo_stream(self, name):
        self.results.append(self.redis.streams[name][0] if name in self.redis.streams else Exception("no such key"))

    def xinfo_groups(self, name):
        self.results.append(self.redis.streams[name][1] if name in self.redis.streams else Exception("no such key"))

    async def execute(self, raise_on_error=True):
        return self.results


class FakeClient:
    def __init__(self, script=answer, raises: Exception | None = None, delay: float = 0.0,
                 first_delay: float = 0.0, ready: bool = True, redis: FakeRedis | None = None,
                 together: bool = False):
        self.names = Names("t")
        self.worker, self.gateway_id = "w0", "gw"
        self.reply_stream = self.names.reply(self.gateway_id)
        self.redis = redis or FakeRedis()
        self.script, self.raises, self.is_ready = script, raises, ready
        self.delay, self.first_delay = delay, first_delay
        self.together = together              # all of a request's items in one batch: a gateway fallen behind
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.num_pending = 0
        self.readiness_checks = 0
        self._ids = 0

    def new_request_id(self, kind="cmpl"):
        self._ids += 1
        return f"{kind}-gw-{self._ids}"

    async def generate(self, request):
        """Like PipelineClient.generate: ends after the last finish (or an error); left early, it aborts. Each item
        comes alone (after its delay), as a gateway that keeps up gets them; or, together, all in one batch."""
        if self.raises is not None:
            raise self.raises
        self.requests.append(request)
        items = self.script(request)
        done = False
        try:
            if self.together:
                await asyncio.sleep(self.first_delay)
                done = True
                yield items
                return
            for i, item in enumerate(items):
                await asyncio.sleep(self.first_delay if i == 0 else self.delay)
                done = i == len(items) - 1 or item.error is not None
                yield [item]
        finally:
            if not done:
                self.aborted.append(request.request_id)

    def first_reply_entry(self, request_ids):
        return "1-0"

    async def ready(self):
        return self.is_ready

    async def worker_info(self):
        return None                      # no worker registered: the gateway's --max-model-len is reported


def settings(**overrides) -> GatewaySettings:
    return GatewaySettings(**{"served_model_name": MODEL, "model": "/models/test", "max_n": 4,
                              "max_model_len": 1024, "max_body_bytes": 4096, "token_text": TokenText(Vocab()),
                              **overrides})


async def call(client: FakeClient, method: str, path: str, gateway_settings: GatewaySettings | None = None,
               **kwargs) -> httpx.Response:
    app = build_app(client, gateway_settings or settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        return await http.request(method, path, **kwargs)


def sse_events(text: str) -> list:
    """The data of each event; [DONE] as the string."""
    assert text.endswith("data: [DONE]\n\n")
    events = [line.removeprefix("data: ") for block in text.split("\n\n") if block
              for line in block.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    return error


# ---- parsing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b'{"prompt": "\xff"}', b'{"prompt": ', b"[1, 2]", b'"text"', b"",
                                 b'{"temperature": NaN}', b'{"temperature": Infinity}', b'\xff\xfe{\x00}\x00'])
def test_body_must_be_a_utf8_json_object(raw):
    with pytest.raises(ProtocolError) as e:
        decode_json_body(raw)
    assert e.value.status == 400


@pytest.mark.parametrize("prompt, expected", [
    ("one", ["one"]),
    (["one", "two"], ["one", "two"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_forms(prompt, expected):
    parsed = parse_completion({"prompt": prompt}, LIMITS)
    assert parsed.prompts == expected
    requests = parsed.generate_requests("cmpl-x", 1.0)
    assert [r.request_id for r in requests] == (["cmpl-x"] if len(expected) == 1
                                                else [f"cmpl-x-{i}" for i in range(len(expected))])
    for r, p in zip(requests, expected):
        assert (r.prompt, r.prompt_token_ids) == ((p, None) if isinstance(p, str) else (None, p))


def test_sampling_fields_reach_the_pipeline():
    parsed = parse_completion({
        "prompt": "x", "n": 2, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "seed": 42, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
        "min_tokens": 2, "stop": "END", "stop_token_ids": [9], "ignore_eos": True, "logprobs": 3, "priority": -1,
        "user": "someone"}, LIMITS)
    p = parsed.params
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (2, 7, 0.5, 0.9, 5, 0.1, 42)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (2, ["END"], [9], True, 3)
    assert parsed.generate_requests("c", 0.0)[0].priority == -1
    assert parse_completion({"prompt": "x"}, LIMITS).params.max_tokens == 16       # OpenAI's legacy default


def test_fields_a_request_leaves_out_take_the_models_sampling_defaults():
    """The model's defaults (engine.model_files.sampling_defaults) fill what a request leaves out, on chat and
    completions alike; what it sets is kept; without model defaults, OpenAI's apply."""
    limits = Limits(MODEL, sampling_defaults={"temperature": 0.2, "top_p": 0.9, "top_k": 20})
    for parse, body in ((parse_completion, {"prompt": "x"}), (parse_chat, {"messages": [{"role": "user",
                                                                                          "content": "Hi"}]})):
        p = parse(body, limits).params
        assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.2, 0.9, 20, 0.0)
        p = parse({**body, "temperature": 0, "top_k": 0}, limits).params
        assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.9, 0)
        p = parse(body, LIMITS).params
        assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)


def test_chat_parsing():
    parsed = parse_chat({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": None}], "max_tokens": 5, "max_completion_tokens": 9}, LIMITS)
    assert [(m.role, m.content) for m in parsed.messages] == [("system", "Be brief."), ("user", "Hello, world"),
                                                              ("assistant", "")]
    assert parsed.params.max_tokens == 9                       # max_completion_tokens wins
    assert parse_chat({"messages": USER}, LIMITS).params.max_tokens is None        # up to the context length
    assert parse_chat({"messages": USER}, LIMITS).params.logprobs is None
    assert parse_chat({"messages": USER, "logprobs": True}, LIMITS).params.logprobs == 0
    assert parse_chat({"messages": USER, "logprobs": True, "top_logprobs": 5}, LIMITS).params.logprobs == 5
    request = parse_chat({"messages": USER, "add_generation_prompt": False}, LIMITS).generate_requests("c", 0.0)
    assert len(request) == 1 and request[0].messages[0].content == "hi" and not request[0].add_generation_prompt


# Every bad input, through the HTTP app: (path, body, status, param). None of them reaches the pipeline.
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", [1]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "\ud800"}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 10}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 5}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, None),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, None),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": "5"}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"one": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(2 ** 70): 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": [5]}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400, None),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [1, "a"]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [-1]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "bad_words": "x"}, 400, "bad_words"),
    ("/v1/completions", {"prompt": "x", "bad_words": [" "]}, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, None),
    ("/v1/completions", {"prompt": "x", "best_of": 5}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, None),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "prompt_logprobs": -1}, 400, None),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": USER}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, "a"]}, 400, "tokens"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "model": 7}, 400, "model"),
    ("/v1/completions", {"prompt": "", "model": "gpt-4"}, 404, "model"),          # the model is checked first
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 0}, 400, None),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 30}, 400, None),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema",
                                                                    "json_schema": {"schema": "{}"}}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"},
                              "guided_regex": "a+"}, 400, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, 400,
     "guided_choice"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400,
     "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {}}, 400, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regexp": "a"}}, 400, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"json": "{not json"}}, 400, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, 400, "guided_choice"),
    ("/v1/completions", {"prompt": "x", "guided_choice": "yes"}, 400, "guided_choice"),
    ("/v1/completions", {"prompt": "x", "guided_json": 5}, 400, "guided_json"),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "root ::= \"\ud800\""}, 400, "guided_grammar"),
    ("/v1/chat/completions", {"messages": USER, "model": "other"}, 404, "model"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(path, body, status, param):
    client = FakeClient()
    # json.dumps escapes non-ASCII, so a lone surrogate travels as the JSON escape "\ud800"
    response = await call(client, "POST", path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = assert_openai_error(response, status, param)
    assert client.requests == []
    if status == 404:
        assert error["type"] == "model_not_found"


@pytest.mark.anyio
@pytest.mark.parametrize("content", [b'{"prompt": "\xff\xfe"}', b'{"prompt": "x",', b'["prompt"]',
                                     b'{"prompt": "x", "temperature": NaN}'])
async def test_malformed_bodies(content):
    client = FakeClient()
    assert_openai_error(await call(client, "POST", "/v1/completions", content=content,
                                   headers={"content-type": "application/json"}), 400)
    assert client.requests == []


@pytest.mark.anyio
async def test_body_too_large_is_refused_without_reading_it():
    client = FakeClient()
    big = json.dumps({"prompt": "x" * 5000}).encode()
    assert_openai_error(await call(client, "POST", "/v1/completions", content=big), 413)

    sent = []

    async def chunked():                  # no Content-Length: the limit applies while reading
        for i in range(100):
            sent.append(i)
            yield b" " * 1000
    response = await call(client, "POST", "/v1/completions", content=chunked())
    assert_openai_error(response, 413)
    assert len(sent) < 10 and client.requests == []


@pytest.mark.anyio
async def test_api_keys():
    client, keyed = FakeClient(), settings(api_keys=["k1", "k2"])
    body = {"prompt": "x"}
    assert_openai_error(await call(client, "POST", "/v1/completions", keyed, json=body), 401)
    assert_openai_error(await call(client, "GET", "/v1/models", keyed, headers={"Authorization": "Bearer k3"}), 401)
    assert_openai_error(await call(client, "GET", "/v1/models", keyed, headers={"Authorization": "k1"}), 401)
    assert (await call(client, "POST", "/v1/completions", keyed, json=body,
                       headers={"Authorization": "Bearer k2"})).status_code == 200
    for open_path in ("/health", "/", "/static/chat.js"):
        assert (await call(client, "GET", open_path, keyed)).status_code == 200, open_path


@pytest.mark.anyio
async def test_metrics_take_the_api_key_or_their_own():
    client, bearer = FakeClient(), lambda key: {"Authorization": f"Bearer {key}"}
    assert (await call(client, "GET", "/metrics")).status_code == 200                       # no keys: open
    keyed = settings(api_keys=["k1"])
    assert_openai_error(await call(client, "GET", "/metrics", keyed), 401)
    assert (await call(client, "GET", "/metrics", keyed, headers=bearer("k1"))).status_code == 200
    scraped = settings(api_keys=["k1"], metrics_keys=["m1"])          # the scraper's key opens only /metrics
    assert_openai_error(await call(client, "GET", "/metrics", scraped, headers=bearer("k1")), 401)
    assert (await call(client, "GET", "/metrics", scraped, headers=bearer("m1"))).status_code == 200
    assert_openai_error(await call(client, "GET", "/v1/models", scraped, headers=bearer("m1")), 401)
    only_metrics = settings(metrics_keys=["m1"])                       # the API open, /metrics not
    assert (await call(client, "GET", "/v1/models", only_metrics)).status_code == 200
    assert_openai_error(await call(client, "GET", "/metrics", only_metrics), 401)


@pytest.mark.anyio
async def test_x_request_id_is_echoed_and_never_used_as_an_id():
    client, traced = FakeClient(), {"X-Request-Id": "trace-42"}
    for stream in (False, True):
        r = await call(client, "POST", "/v1/completions", json={"prompt": "x", "stream": stream}, headers=traced)
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        ids = {e["id"] for e in sse_events(r.text)[:-1]} if stream else {r.json()["id"]}
        assert ids == {client.requests[-1].request_id} and "trace-42" not in ids.pop()    # the gateway's own
    assert [r.request_id for r in client.requests] == ["cmpl-gw-1", "cmpl-gw-2"]
    refused = await call(client, "GET", "/v1/models", settings(api_keys=["k"]), headers=traced)
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "trace-42"
    for untraceable in ("a" * 129, "has space", "caf\u00e9"):
        r = await call(client, "GET", "/health", headers={"X-Request-Id": untraceable.encode("utf-8")})
        assert r.status_code == 200 and "x-request-id" not in r.headers
    assert "x-request-id" not in (await call(client, "GET", "/health")).headers


@pytest.mark.anyio
@pytest.mark.parametrize("raises, status", [(Overloaded("full"), 429), (Unavailable("scheduler down"), 503)])
async def test_admission_errors(raises, status):
    for stream in (False, True):
        response = await call(FakeClient(raises=raises), "POST", "/v1/chat/completions",
                              json={"messages": USER, "stream": stream})
        assert_openai_error(response, status)


def _fails_first(request):
    return [ReplyItem(request.request_id, error=ErrorInfo("the prompt is too long", code=400, param="prompt"))]


@pytest.mark.anyio
async def test_an_error_before_any_output_gets_its_status():
    for stream in (False, True):
        response = await call(FakeClient(script=_fails_first), "POST", "/v1/completions",
                              json={"prompt": "x", "stream": stream})
        error = assert_openai_error(response, 400, "prompt")
        assert error["message"] == "the prompt is too long" and error["type"] == "invalid_request_error"


def _fails_later(request):
    return answer(request, ("a", "b"))[:1] + [
        ReplyItem(request.request_id, error=ErrorInfo("the worker restarted", type="service_unavailable", code=503))]


@pytest.mark.anyio
async def test_an_error_mid_stream_is_an_error_event():
    response = await call(FakeClient(script=_fails_later), "POST", "/v1/completions", json={"prompt": "x",
                                                                                              "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1] == {"error": {"message": "the worker restarted", "type": "service_unavailable",
                                   "param": None, "code": 503}}
    assert events[2:] == ["[DONE]"]
    # not streaming: the error is the answer
    assert_openai_error(await call(FakeClient(script=_fails_later), "POST", "/v1/completions",
                                   json={"prompt": "x"}), 503)


@pytest.mark.anyio
async def test_an_error_in_one_prompt_aborts_the_others():
    def script(request):
        return _fails_first(request) if request.request_id.endswith("-1") else answer(request)
    client = FakeClient(script=script, delay=0.05)
    assert_openai_error(await call(client, "POST", "/v1/completions", json={"prompt": ["a", "b"]}), 400)
    assert client.aborted == ["cmpl-gw-1-0"]


# ---- response shapes -------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_completion_response():
    client = FakeClient()
    response = await call(client, "POST", "/v1/completions", json={"prompt": ["a", "b"], "n": 2, "stop": ["!"]})
    body = response.json()
    assert response.status_code == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert isinstance(body["created"], int)
    assert [(c["index"], c["text"], c["finish_reason"], c["logprobs"]) for c in body["choices"]] == [
        (i, "Hello", "stop", None) for i in range(4)]
    # the prompt's tokens count once per prompt, the generated ones for every choice
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert [r.params.stop for r in client.requests] == [["!"], ["!"]]


@pytest.mark.anyio
async def test_chat_response():
    body = (await call(FakeClient(), "POST", "/v1/chat/completions", json={"messages": USER, "model": MODEL}
                       )).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                                "finish_reason": "stop", "stop_reason": None}]
    assert body["usage"]["completion_tokens"] == 2 and body["usage"]["total_tokens"] == 5


@pytest.mark.anyio
async def test_chat_stream_chunks():
    response = await call(FakeClient(), "POST", "/v1/chat/completions",
                          json={"messages": USER, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in chunks[:-1])
    # first each choice's role, then the content, each choice ending with a finish_reason
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:-1] if c["choices"][0]["index"] == index]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == "Hello"
        assert [ch["finish_reason"] for ch in mine] == [None, "stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                   "prompt_tokens_details": {"cached_tokens": 1}}


def _held_back(request):
    # the first token's text is held back (half a character), the second releases both
    return [ReplyItem(request.request_id, 0, 0, "", [5], None, None, None, 3, 0),
            ReplyItem(request.request_id, 0, 1, "é", [6], None, None, None, 3, 0),
            ReplyItem(request.request_id, 0, 2, "", [2], None, "stop", 2, 3, 0)]


@pytest.mark.anyio
@pytest.mark.parametrize("path, body, script", [
    ("/v1/chat/completions", {"messages": USER, "n": 2, "logprobs": True, "top_logprobs": 2,
                              "stream_options": {"include_usage": True}}, answer),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, _held_back),
    ("/v1/completions", {"prompt": "x"}, _fails_later)])
async def test_items_that_came_in_together_stream_as_they_would_one_at_a_time(path, body, script):
    """A gateway that fell behind gets a request's items in one batch and writes them at once: the client sees
    the same events, each item's with its own id (a stream resumes from any of them), as when they came one by
    one."""
    def events(response: httpx.Response) -> tuple[list, list[str]]:
        assert response.status_code == 200
        data = [e if e == "[DONE]" else {**e, "created": 0} for e in sse_events(response.text)]
        return data, [line for line in response.text.split("\n") if line.startswith("id: ")]

    body = {**body, "model": MODEL, "stream": True}
    alone = events(await call(FakeClient(script=script), "POST", path, json=body))
    together = events(await call(FakeClient(script=script, together=True), "POST", path, json=body))
    assert together == alone and alone[1]


@pytest.mark.anyio
async def test_completion_stream_chunks():
    response = await call(FakeClient(script=_held_back), "POST", "/v1/completions",
                          json={"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_events(response.text)[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    # no chunk for the held-back token; the last one ends the choice with no text
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"], c["choices"][0]["stop_reason"])
            for c in chunks[:-1]] == [("é", None, None), ("", "stop", 2)]
    assert chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.anyio
async def test_echo():
    body = (await call(FakeClient(), "POST", "/v1/completions", json={"prompt": [[1, 2], [3]], "echo": True})).json()
    assert [c["text"] for c in body["choices"]] == ["<1><2>Hello", "<3>Hello"]
    response = await call(FakeClient(), "POST", "/v1/completions", json={"prompt": "Say", "echo": True,
                                                                         "stream": True})
    assert [c["choices"][0]["text"] for c in sse_events(response.text)[:-1]] == ["SayHel", "lo"]
    # token prompts cannot be echoed without a tokenizer
    no_tokenizer = settings(token_text=TokenText())
    assert_openai_error(await call(FakeClient(), "POST", "/v1/completions", no_tokenizer,
                                   json={"prompt": [1, 2], "echo": True}), 400, "echo")


# ---- logprobs ----------------------------------------------------------------------------------------------------
def test_logprobs_shapes():
    text = TokenText(Vocab())
    entries = [TokenLogprobsWire(-0.5, [10, 11], [-0.5, -1.0]), TokenLogprobsWire(-2.0, [12, 13], [-0.1, -2.0])]
    assert completion_logprobs([10, 13], entries, text, text_offset=4) == {
        "tokens": ["<10>", "<13>"], "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"<10>": -0.5, "<11>": -1.0}, {"<12>": -0.1, "<13>": -2.0}],
        "text_offset": [4, 8]}
    # the sampled token is always among the completions alternatives (up to k+1 of them)
    assert completion_logprobs([9], [TokenLogprobsWire(-3.0, [10], [-0.5])], text, 0)["top_logprobs"] == [
        {"<10>": -0.5, "<9>": -3.0}]
    assert chat_logprobs([10], entries[:1], text, top_n=1) == [
        {"token": "<10>", "logprob": -0.5, "bytes": list(b"<10>"),
         "top_logprobs": [{"token": "<10>", "logprob": -0.5, "bytes": list(b"<10>")}]}]
    assert TokenText()(42) == "token_id:42"


@pytest.mark.anyio
async def test_logprobs_in_responses():
    body = (await call(FakeClient(), "POST", "/v1/completions", json={"prompt": "x", "logprobs": 2})).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["<100>", "<101>"]
    assert logprobs["text_offset"] == [0, 5]                  # continues across items
    assert logprobs["token_logprobs"] == [-0.25, -0.25]
    assert logprobs["top_logprobs"][0] == {"<100>": -0.25, "<7>": -1.5}

    response = await call(FakeClient(), "POST", "/v1/chat/completions",
                          json={"messages": USER, "logprobs": True, "top_logprobs": 2, "stream": True})
    chunks = sse_events(response.text)[1:-1]
    content = [entry for c in chunks for entry in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in content] == ["<100>", "<101>"]
    assert [len(e["top_logprobs"]) for e in content] == [2, 2]
    assert content[0]["top_logprobs"][1] == {"token": "<7>", "logprob": -1.5, "bytes": list(b"<7>")}


def test_builder_places_choices_by_prompt_and_index():
    parsed = parse_completion({"prompt": ["a", "b"], "n": 2, "stream": True}, LIMITS)
    builder = ResponseBuilder(parsed, "cmpl-1", 0, TokenText())
    chunk = builder.add(1, ReplyItem("cmpl-1-1", 1, 0, "z", [4], None, "length", None, 2, 0))
    assert chunk["choices"][0]["index"] == 3 and chunk["choices"][0]["finish_reason"] == "length"


# ---- other endpoints -------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_models_health_and_page():
    client = FakeClient()
    models = (await call(client, "GET", "/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["root"], m["max_model_len"]) for m in models["data"]] == [
        (MODEL, "model", "/models/test", 1024)]
    assert (await call(client, "GET", f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert_openai_error(await call(client, "GET", "/v1/models/nope"), 404)
    assert_openai_error(await call(client, "GET", "/v1/nothing"), 404)
    assert_openai_error(await call(client, "GET", "/v1/completions"), 405)
    assert (await call(client, "GET", "/health")).status_code == 200
    assert (await call(client, "GET", "/health/ready")).status_code == 200
    not_ready = await call(FakeClient(ready=False), "GET", "/health/ready")
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "not ready"
    page = await call(client, "GET", "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/chat.js" in page.text


@pytest.mark.anyio
async def test_openapi_document_covers_every_api_route():
    app_paths = {route.path.replace(":path}", "}") for route in build_app(FakeClient(), settings()).routes}
    doc = (await call(FakeClient(), "GET", "/openapi.json")).json()
    assert set(doc["paths"]) == app_paths - {"/", "/static", "/openapi.json"}         # the page, and itself
    assert doc["paths"]["/v1/completions"]["post"]["security"] == []                    # no keys: open
    keyed = (await call(FakeClient(), "GET", "/openapi.json", settings(api_keys=["k"]),
                        headers={"Authorization": "Bearer k"})).json()
    assert keyed["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert keyed["paths"]["/health"]["get"].get("security") is None


# ---- metrics -------------------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, through prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_exposition_is_parsed_by_prometheus_client():
    counter = Counter("x_requests_total", "Requests.\nBy status.", ["status"])
    counter.inc(status="200")
    counter.inc(2, status="200")
    counter.inc(status='4"\\\n')
    gauge = Gauge("x_pending", "Pending.")
    gauge.set(7)
    histogram = Histogram("x_latency_seconds", "Latency.", [0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    samples = parse_metrics(exposition([counter, gauge, histogram]))
    assert samples[("x_requests_total", (("status", "200"),))] == 3
    assert samples[("x_requests_total", (("status", '4"\\\n'),))] == 1
    assert samples[("x_pending", ())] == 7
    assert [samples[("x_latency_seconds_bucket", (("le", le),))] for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert samples[("x_latency_seconds_count", ())] == 4
    assert samples[("x_latency_seconds_sum", ())] == pytest.approx(3.65)


STATS = {"running": "3", "waiting": "1", "preemptions": "2", "kv_blocks_total": "100", "kv_blocks_used": "40",
         "kv_usage": "0.4", "kv_slot_waste": "0.05", "prefix_cache_queries": "10", "prefix_cache_hits": "4",
         "prefix_cache_hit_rate": "0.4", "queue_time_sum": "1.5", "queue_time_count": "4",
         "queue_time_bucket:0.1": "1", "queue_time_bucket:1.0": "3", "queue_time_bucket:+Inf": "4"}


def test_scheduler_stats_as_metrics():
    samples = parse_metrics(exposition(scheduler_metrics({k.encode(): v.encode() for k, v in STATS.items()})))
    assert samples[("pagestream_num_requests_running", ())] == 3
    assert samples[("pagestream_num_requests_waiting", ())] == 1
    assert samples[("pagestream_kv_cache_usage_ratio", ())] == 0.4
    assert samples[("pagestream_kv_cache_slot_waste_ratio", ())] == 0.05
    assert samples[("pagestream_kv_blocks_used", ())] == 40
    assert samples[("pagestream_prefix_cache_hit_rate", ())] == 0.4
    assert samples[("pagestream_num_preemptions_total", ())] == 2
    assert [samples[("pagestream_request_queue_time_seconds_bucket", (("le", le),))]
            for le in ("0.1", "1.0", "+Inf")] == [1, 3, 4]
    assert samples[("pagestream_request_queue_time_seconds_sum", ())] == 1.5
    # missing or unreadable fields are left out
    partial = parse_metrics(exposition(scheduler_metrics({"running": "2", "kv_usage": "n/a"})))
    assert set(partial) == {("pagestream_num_requests_running", ())}


def test_stream_lag_metrics():
    info = {"last-generated-id": b"5000-2", "first-entry": (b"1000-0", {})}
    groups = [{"name": b"detokenizer", "pending": 3, "last-delivered-id": b"3500-0"},            # Redis 6.2
              {"name": "late", "pending": 0, "last-delivered-id": b"0-0", "lag": 9}]              # Redis 7
    samples = parse_metrics(exposition(stream_metrics([("tokens:0", info, groups), ("gone", None, [])])))
    key = (("group", "detokenizer"), ("stream", "tokens:0"))
    assert samples[("pagestream_stream_pending_entries", key)] == 3
    assert samples[("pagestream_stream_lag_seconds", key)] == 1.5
    late = (("group", "late"), ("stream", "tokens:0"))
    assert samples[("pagestream_stream_lag_entries", late)] == 9
    assert samples[("pagestream_stream_lag_seconds", late)] == 4.0       # from the oldest entry
    assert ("pagestream_stream_lag_entries", key) not in samples


@pytest.mark.anyio
async def test_pipeline_scraper():
    names = Names("t")
    streams = {names.tokenize: ({"last-generated-id": b"2000-0"},
                                [{"name": b"tokenizer", "pending": 1, "last-delivered-id": b"2000-0"}]),
               names.tokens(3): ({"last-generated-id": b"9000-0"},
                              [{"name": b"detokenizer", "pending": 0, "last-delivered-id": b"8000-0"}]),
               names.reply("gw"): ({"last-generated-id": b"7000-0"}, [])}
    scraper = PipelineScraper(FakeRedis(STATS, streams), names, names.reply("gw"), lambda: b"6500-1")
    samples = parse_metrics(exposition(await scraper.collect()))
    assert samples[("pagestream_num_requests_running", ())] == 3
    assert samples[("pagestream_stream_pending_entries", (("group", "tokenizer"), ("stream", "tokenize")))] == 1
    assert samples[("pagestream_stream_lag_seconds", (("group", "detokenizer"), ("stream", "tokens:3")))] == 1.0
    assert samples[("pagestream_stream_lag_seconds", (("group", "gateway"), ("stream", "reply:gw")))] == 0.5


@pytest.mark.anyio
async def test_metrics_endpoint_counts_requests():
    client = FakeClient(redis=FakeRedis(STATS))
    gateway = settings(metrics=GatewayMetrics())
    await call(client, "POST", "/v1/completions", gateway, json={"prompt": ["a", "b"], "n": 2})
    await call(client, "POST", "/v1/chat/completions", gateway, json={"messages": USER, "stream": True})
    await call(client, "POST", "/v1/completions", gateway, json={"prompt": ""})
    response = await call(client, "GET", "/metrics", gateway)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_metrics(response.text)
    assert samples[("pagestream_requests_total", (("status", "200"),))] == 2
    assert samples[("pagestream_requests_total", (("status", "400"),))] == 1
    assert samples[("pagestream_generation_tokens_total", ())] == 8 + 2
    assert samples[("pagestream_prompt_tokens_total", ())] == 6 + 3
    assert samples[("pagestream_time_to_first_token_seconds_count", ())] == 2
    assert samples[("pagestream_e2e_request_latency_seconds_count", ())] == 2
    assert samples[("pagestream_inter_token_latency_seconds_count", ())] == 4 + 1     # per completion
    assert samples[("pagestream_gateway_pending_requests", ())] == 0
    assert samples[("pagestream_num_requests_waiting", ())] == 1


# ---- a client that goes away, under uvicorn ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _until(condition, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.anyio
async def test_disconnecting_aborts_the_request():
    """Streaming, waiting for the first token, and not streaming: closing the connection aborts at once."""
    def long_answer(request):
        return answer(request, pieces=["x"] * 1000)

    client = FakeClient(script=long_answer, delay=0.02)
    gateway = settings(metrics=GatewayMetrics())
    server = uvicorn.Server(uvicorn.Config(build_app(client, gateway), host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    await _until(lambda: server.started, 10)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            async with http.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if '"content":"x"' in line:
                        break
            assert await _until(lambda: client.aborted == ["chatcmpl-gw-1"], 1.0) < 1.0

            client.first_delay = 30.0            # still waiting for its first token
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json={"prompt": "x", "stream": True}, timeout=0.3)
            await _until(lambda: client.aborted[-1:] == ["cmpl-gw-2"], 1.0)

            client.first_delay = 0.0
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000}, timeout=0.3)
            await _until(lambda: client.aborted[-1:] == ["cmpl-gw-3"], 1.0)
        samples = parse_metrics(exposition(gateway.metrics.all()))
        assert samples[("pagestream_requests_total", (("status", "499"),))] == 3
    finally:
        server.should_exit = True
        await serving
