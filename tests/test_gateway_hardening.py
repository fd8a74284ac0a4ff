"""The gateway, safe to run by strangers: against a real `pagestream serve` (its own redis-server, the default
model), over real HTTP and raw sockets. Readiness probes are shared by every caller, and answered while a queue
waits; /metrics takes a key."""
from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import _free_port, start_stack, stop_stack
from services.pipeline_client import READY_TTL_S

API_KEY = "test-key"
METRICS_KEY = "scrape-key"
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Two sequences at a time: a third request waits for admission (the readiness test makes a queue).
    s = start_stack(tmp_path_factory.mktemp("hardened"), "--metrics-key", METRICS_KEY, "--timeout-header",
                    str(HEADER_TIMEOUT_S), "--max-num-seqs", "2", api_key=API_KEY)
    yield s
    stop_stack(s)


# ---- /health/ready: one probe a second, however many ask, answered ahead of the queue --------------------------
def test_a_server_with_a_queue_is_ready(stack):
    """Two requests fill both sequence slots (the first ends sooner), two more wait: when the first ends, the probe
    takes its slot ahead of them, so its answer comes before their first tokens (in line behind them, it would
    come after both), and a busy server is ready: its answer says the pipeline works, not how long the queue is."""
    async def with_a_queue() -> tuple[httpx.Response, float, list[float]]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async def stream(max_tokens: int, started: asyncio.Event) -> float:
                """When its first token came."""
                body = {"model": "smollm2-135m-instruct", "prompt": "Tell me a story.", "max_tokens": max_tokens,
                        "ignore_eos": True, "stream": True}
                first = math.inf
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and not started.is_set():
                            first = time.monotonic()
                            started.set()
                return first

            def start(max_tokens: int) -> tuple[asyncio.Task, asyncio.Event]:
                started = asyncio.Event()
                return asyncio.create_task(stream(max_tokens, started)), started

            await asyncio.sleep(READY_TTL_S)            # an answer cached earlier has expired: the next call probes
            # Long enough that the queue forms, and is seen, well before the first one ends (0.1-0.3 s a token).
            running = [start(30), start(60)]
            await asyncio.wait_for(asyncio.gather(*(started.wait() for _, started in running)), 60)
            waiting = [start(8), start(8)]
            while await asyncio.to_thread(stack.metric, "pagestream_num_requests_waiting", METRICS_KEY) < 2:
                assert not any(task.done() for task, _ in running), "no queue formed"
                await asyncio.sleep(0.1)
            ready = await http.get("/health/ready")
            answered = time.monotonic()
            await asyncio.gather(*(task for task, _ in running))
            return ready, answered, await asyncio.gather(*(task for task, _ in waiting))

    ready, answered, queued_first_tokens = asyncio.run(with_a_queue())
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert answered < min(queued_first_tokens), (answered, queued_first_tokens)


def test_200_concurrent_readiness_calls_share_one_probe(stack):
    time.sleep(READY_TTL_S)                           # whatever answer is cached has expired
    before = stack.metric("pagestream_gateway_readiness_checks_total", METRICS_KEY)

    async def all_at_once() -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=60) as http:
            start = time.monotonic()
            responses = await asyncio.gather(*(http.get("/health/ready") for _ in range(200)))
            return responses, time.monotonic() - start

    responses, took = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 200
    assert {r.json()["status"] for r in responses} == {"ready"}
    probes = stack.metric("pagestream_gateway_readiness_checks_total", METRICS_KEY) - before
    # at least one probe (the cache had expired), and then at most one more per second the calls took
    assert 1 <= probes <= 1 + math.ceil(took / READY_TTL_S), (probes, took)


# ---- /metrics takes a key ------------------------------------------------------------------------------------
def test_metrics_need_their_key(stack):
    url = f"{stack.base_url}/metrics"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    # with a metrics key of its own, the API key does not open /metrics, nor the metrics key the API
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).status_code == 401
    assert httpx.get(f"{stack.base_url}/v1/models", headers={"Authorization": f"Bearer {METRICS_KEY}"},
                     timeout=30).status_code == 401
    ok = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=30)
    assert ok.status_code == 200 and "pagestream_requests_total" in ok.text


@contextlib.asynccontextmanager
async def gateway_alone(redis_url: str, settings):
    """The gateway by itself, with no pipeline behind it (/metrics and /v1/models need only Redis): the real
    PipelineClient on a real redis-server, under the gateway's own uvicorn server. Yields (base URL, client)."""
    import uvicorn

    from services.gateway import _Server, build_app
    from services.pipeline_client import PipelineClient

    client = PipelineClient(redis_url, prefix=f"alone{_free_port()}")
    await client.start()
    port = _free_port()
    server = _Server(uvicorn.Config(build_app(client, settings), host="127.0.0.1", port=port, log_config=None,
                                    lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}", client
    finally:
        server.should_exit = True
        await serving
        await client.close()


def test_metrics_are_open_where_no_key_is_set(redis_url):
    from services.gateway import GatewaySettings

    async def scrape() -> int:
        async with gateway_alone(redis_url, GatewaySettings("m", "m")) as (url, _):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                return (await http.get("/metrics")).status_code

    assert asyncio.run(scrape()) == 200


def test_the_gateway_opens_its_redis_connections_before_it_serves(redis_url):
    """A burst of requests as large as the pool, right after the start, finds every connection open: opened on
    demand, each would wait for its connect and handshake."""
    import psutil

    from services.pipeline_client import REDIS_CONNECTIONS, PipelineClient

    redis_port = urlsplit(redis_url).port

    def open_to_redis() -> int:
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED)

    async def burst_after_start() -> tuple[int, int]:
        before = open_to_redis()
        client = PipelineClient(redis_url, prefix=f"warm{_free_port()}")
        await client.start()
        try:
            opened = open_to_redis() - before
            assert all(await asyncio.gather(*(client.redis.ping() for _ in range(REDIS_CONNECTIONS))))
            return opened, open_to_redis() - before
        finally:
            await client.close()

    opened, after_burst = asyncio.run(burst_after_start())
    assert opened >= REDIS_CONNECTIONS
    assert after_burst - opened <= 1       # at most the reply reader's own, which its task opens once it runs


# ---- slow clients and large heads ----------------------------------------------------------------------------
def connect(stack) -> socket.socket:
    url = urlsplit(stack.base_url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"") -> float:
    """Sends trickle a byte every 0.2 s (then nothing) until the server closes the connection."""
    start = time.monotonic()
    sock.settimeout(0.2)
    pending = list(trickle)
    while True:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        assert time.monotonic() - start < 30, "the server never closed the connection"
        if pending:
            try:
                sock.sendall(bytes([pending.pop(0)]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start


def test_slow_request_heads_are_cut_off_and_the_server_still_serves(stack):
    half_a_request_line = b"GET /health HT"
    with connect(stack) as slowloris:
        slowloris.sendall(half_a_request_line[:5])
        took = seconds_until_closed(slowloris, trickle=half_a_request_line[5:] + b"TP/1.1\r\nX-Slow: " + b"a" * 100)
    assert HEADER_TIMEOUT_S * 0.9 <= took < HEADER_TIMEOUT_S + 2, took
    with connect(stack) as silent:                                  # connects and never sends a byte
        assert seconds_until_closed(silent) < HEADER_TIMEOUT_S + 2
    with connect(stack) as kept_alive:                              # after one response, the next head is due too
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
        kept_alive.sendall(b"GET /hea")
        assert seconds_until_closed(kept_alive, trickle=b"lth HTTP/1.1\r\n" * 4) < HEADER_TIMEOUT_S + 2
    assert httpx.get(f"{stack.base_url}/health", timeout=30).status_code == 200


def test_a_slow_but_whole_request_is_served(stack):
    """A head that arrives within the deadline, and a response that takes longer than it, are not cut."""
    with connect(stack) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(HEADER_TIMEOUT_S / 2)
        sock.sendall(b"Host: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "smollm2-135m-instruct", "prompt": "Count to one hundred:", "max_tokens": 64,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, headers=headers, timeout=120) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 10


def test_a_request_head_over_the_limit_gets_400(stack):
    """h11 measures a head while it is incomplete: one that grows past the limit before its end is refused."""
    with connect(stack) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 10))
        time.sleep(0.5)
        with contextlib.suppress(OSError):              # the server may have closed already
            sock.sendall(b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{stack.base_url}/health", timeout=30).status_code == 200


# ---- X-Request-Id: echoed, never ours ------------------------------------------------------------------------
def test_x_request_id_is_echoed_and_two_clients_sharing_one_get_their_own_answers(stack):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def ask(prompt: str):
        return await client.completions.with_raw_response.create(
            model="smollm2-135m-instruct", prompt=prompt, max_tokens=8, temperature=0,
            extra_headers={"X-Request-Id": "same-for-both"})

    async def both():
        try:
            return await asyncio.gather(ask("The capital of France is"), ask("def add(a, b):"))
        finally:
            await client.close()

    raw = asyncio.run(both())
    assert [r.headers["x-request-id"] for r in raw] == ["same-for-both"] * 2
    first, second = (r.parse() for r in raw)
    assert first.id != second.id and first.id.startswith("cmpl-") and "same-for-both" not in first.id + second.id
    assert first.choices[0].text and second.choices[0].text and first.choices[0].text != second.choices[0].text


# ---- /v1/models: the context length the engine serves --------------------------------------------------------
def test_models_report_the_max_model_len_the_worker_registered(redis_url):
    from schemas.codec import encode
    from schemas.messages import WorkerInfo
    from services.gateway import GatewaySettings

    async def lengths() -> list:
        async with gateway_alone(redis_url, GatewaySettings("m", "m", max_model_len=None)) as (url, client):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                unknown = (await http.get("/v1/models")).json()["data"][0]["max_model_len"]
                info = WorkerInfo("w0", "epoch", 100, 16, 777, 512, [2])      # as a worker registers
                await client.redis.set(client.names.alive("worker", "w0"), "epoch")
                await client.redis.set(client.names.worker_info("w0"), encode(info))
                await client.redis.sadd(client.names.workers, "w0")
                listed = (await http.get("/v1/models")).json()["data"][0]["max_model_len"]
                card = (await http.get("/v1/models/m")).json()["max_model_len"]
                return [unknown, listed, card]

    assert asyncio.run(lengths()) == [None, 777, 777]


def test_models_report_the_served_max_model_len(stack):
    import openai
    import redis

    from schemas.codec import decode
    from schemas.messages import WorkerInfo
    from services.transport import Names

    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEY, max_retries=0)
    listed = client.models.list().data[0].model_extra["max_model_len"]
    with redis.Redis.from_url(stack.redis_url) as r:
        registered = decode(WorkerInfo, r.get(Names(stack.prefix).worker_info("w0"))).max_model_len
    assert listed == registered == 2048                              # start_stack serves --max-model-len 2048


# ---- the OpenAPI schema, and fuzzing the API against it ------------------------------------------------------
FUZZ_MAX_TOKENS = 1
FUZZ_EXAMPLES = 12                     # per operation and mode: about 90 s on a loaded 2-core CPU
FUZZ_MAX_SEQUENCES = 2                # prompts (each a pipeline request), messages, completions per prompt


def bound(body) -> None:
    """Keeps a generated request cheap on a shared CPU, whatever else it holds: one token (chat without
    max_tokens would run to the context length, completions to 16), a couple of prompts and completions."""
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > FUZZ_MAX_TOKENS:
            body[name] = FUZZ_MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = FUZZ_MAX_TOKENS
    for name in ("n", "best_of"):
        if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > FUZZ_MAX_SEQUENCES:
            body[name] = FUZZ_MAX_SEQUENCES
    for name in ("prompt", "messages"):
        if isinstance(body.get(name), list):
            body[name] = body[name][:FUZZ_MAX_SEQUENCES]


def test_openapi_schema_matches_the_routes(stack):
    assert httpx.get(f"{stack.base_url}/openapi.json", timeout=30).status_code == 401     # it names the model
    doc = httpx.get(f"{stack.base_url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=30).json()
    assert doc["openapi"].startswith("3.") and set(doc["paths"]) == {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/health", "/health/ready",
        "/metrics", "/tokenize", "/detokenize"}
    completion = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert completion["properties"]["model"]["enum"] == ["smollm2-135m-instruct"]
    assert completion["properties"]["max_tokens"]["maximum"] == 2048                  # the served context length


def test_fuzzing_the_api_from_its_schema_finds_no_server_error(stack):
    """schemathesis generates requests from /openapi.json, valid ones and invalid ones, for every operation
    (bounded: FUZZ_EXAMPLES of each kind, one token each): none may get a 5xx, and the server serves afterwards."""
    import collections
    import itertools

    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    keys = {"/metrics": METRICS_KEY}
    doc = httpx.get(f"{stack.base_url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    statuses: collections.Counter = collections.Counter()
    session = requests.Session()
    start = time.monotonic()
    # Operation by operation: drawn over all of them at once, the large chat schema got too few examples.
    operations = [(path, method.upper()) for path, item in doc["paths"].items() for method in item]
    for (path, method), mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=schema[path][method].as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            bound(case.body)
            key = keys.get(case.operation.path, API_KEY)
            response = case.call(base_url=stack.base_url, session=session,
                                 headers={"Authorization": f"Bearer {key}"}, timeout=120)
            statuses[mode.value, case.operation.label, response.status_code] += 1
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text)

        try:
            fuzz()
        except Unsatisfiable:          # nothing to vary (a GET without parameters has no invalid form)
            pass
    took = time.monotonic() - start
    print(f"fuzzed in {took:.1f} s:", dict(sorted(statuses.items())))
    generated = {(mode, label) for mode, label, status in statuses if status == 200}
    assert ("positive", "POST /v1/completions") in generated and ("positive", "POST /v1/chat/completions") in generated
    assert httpx.get(f"{stack.base_url}/health/ready", timeout=30).status_code == 200
    after = httpx.post(f"{stack.base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"
