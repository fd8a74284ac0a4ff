"""Redis is a supervised part of `pagestream serve`: with real processes, a real redis-server, nothing mocked.

- The embedded Redis wants its password, and keeps streams, groups and pending entries across a SIGKILL and a
  restart (its append-only file); a consumer that lost its connection reads its own pending entries again.
- The gateway's end (PipelineClient): a request in flight ends with a 503 within REDIS_LOST_S (and a little) of
  Redis going away, or goes on if Redis is back sooner.
- Served: SIGKILL the embedded redis-server while greedy streams run: each stream either ends with exactly the
  text it gets undisturbed or with an error event, none hangs; serve restarts Redis on its port (with its
  password), /health/ready answers 200 again within 15 s, and no service restarted.
- SIGKILL serve itself: no service, no publisher and no redis-server is left running.
"""
from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import _free_port, start_stack, stop_stack
from schemas.codec import encode
from schemas.messages import GenerateRequest, Reply, ReplyItem
from schemas.sampling_params import SamplingParams
from services.pipeline_client import REDIS_LOST_S, PipelineClient
from services.redis_server import RedisServer
from services.runtime import keep_running
from services.transport import Transport

MODEL = "smollm2-135m-instruct"
SERVICES = ("worker", "scheduler", "tokenizer", "detokenizer", "gateway")
ERROR_BOUND_S = REDIS_LOST_S + 5        # a stream that fails has its error event this soon after the kill
STREAMS_BOUND_S = 120                   # every stream has ended this soon after the kill (none hangs)
READY_AGAIN_S = 15
GONE_S = 20                             # after serve's SIGKILL, every process it started has exited this soon


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def anonymous(port: int) -> redis.Redis:
    """A client without the password (and without redis-py's retries: a refusal is final)."""
    return redis.Redis(port=port, retry=Retry(NoBackoff(), 0))


# ---- the embedded Redis on its own -------------------------------------------------------------------------------
class Server:
    """A RedisServer this test starts, kills and starts again, as serve's supervisor does."""

    def __init__(self):
        self.server = RedisServer(_free_port())
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.server.argv)
        self.server.wait_until_serving(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.server.remove()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_the_password_is_required_and_streams_outlive_a_restart(server):
    url = server.server.url
    assert url.startswith("redis://:") and "@127.0.0.1:" in url
    with pytest.raises(redis.AuthenticationError), anonymous(server.server.port) as client:
        client.ping()
    assert oct(server.server.config.stat().st_mode & 0o777) == "0o600"
    assert server.server.password not in " ".join(psutil.Process(server.proc.pid).cmdline())

    transport = Transport(url, prefix="sup")                  # a password URL, as every service gets it
    stream = transport.names.tokenize
    for i in range(3):
        transport.publish(stream, b"m%d" % i)
    first = transport.read([stream], "g", "c", count=2)       # delivered, never handled: pending
    assert [e.payload for e in first] == [b"m0", b"m1"]
    server.kill()
    with pytest.raises(redis.ConnectionError):
        transport.read([stream], "g", "c")
    transport.lost_connection()
    server.start()                                            # same port, password and append-only file
    assert transport.redis.xpending(stream, "g")["pending"] == 2
    # Its own pending entries first, in order, then the new one.
    again = transport.read([stream], "g", "c", count=1) + transport.read([stream], "g", "c", count=1)
    assert [e.payload for e in again] == [b"m0", b"m1"]
    assert [e.payload for e in transport.read([stream], "g", "c")] == [b"m2"]


def test_a_loop_waits_redis_out_and_goes_on(server):
    transport = Transport(server.server.url, prefix="loop")
    stream, handled, stop = transport.names.tokenize, [], threading.Event()

    def iteration() -> None:
        for entry in transport.read([stream], "g", "c", count=8, block_ms=50):
            pipe = transport.pipeline()
            transport.ack(stream, "g", [entry.id], pipe)
            pipe.execute()
            handled.append(entry.payload)

    loop = threading.Thread(target=keep_running, args=(stop, iteration, "test loop", transport))
    loop.start()
    try:
        transport.publish(stream, b"before")
        wait_for(lambda: handled == [b"before"], 5, "the first entry")
        server.kill()
        time.sleep(1.5)
        assert loop.is_alive()
        server.start()
        transport.publish(stream, b"after")
        wait_for(lambda: handled[-1:] == [b"after"], 5, "the entry sent after the restart")
        assert handled == [b"before", b"after"]
    finally:
        stop.set()
        loop.join(timeout=5)
    assert not loop.is_alive()


# ---- the gateway's end ---------------------------------------------------------------------------------------
async def in_flight(server: Server, outage_s: float | None) -> tuple[list[ReplyItem], float]:
    """One request in flight through a PipelineClient (its pipeline played by this test: heartbeats and a reply
    written here). Redis is killed; if outage_s is given it is back after that long, and a reply follows.
    Returns what the request got, and when its last item came (seconds after the kill)."""
    client = PipelineClient(server.server.url, prefix=f"gw{_free_port()}")
    names = client.names
    beat = redis.Redis.from_url(server.server.url)
    beat.set(names.alive("scheduler"), "s1")
    beat.set(names.alive("worker", "w0"), "w1")
    beat.sadd(names.workers, "w0")
    await client.start()
    request = GenerateRequest(request_id="r1", gateway="", params=SamplingParams(max_tokens=4), arrival=time.time(),
                              prompt="hi")
    items: list[ReplyItem] = []
    done_at = 0.0

    async def consume() -> None:
        nonlocal done_at
        async for batch in client.generate(request):
            items.extend(batch)
            done_at = time.monotonic()

    task = asyncio.create_task(consume())
    while not beat.xlen(names.tokenize):
        await asyncio.sleep(0.05)
    server.kill()
    killed_at = time.monotonic()
    try:
        if outage_s is not None:
            await asyncio.sleep(outage_s)
            server.start()
            beat = redis.Redis.from_url(server.server.url)
            reply = Reply([ReplyItem(request_id="r1", index=0, seq=0, text="hello", finish_reason="length")])
            beat.xadd(client.reply_stream, {b"m": encode(reply)})
        await asyncio.wait_for(task, REDIS_LOST_S + 5)
    finally:
        task.cancel()
        await client.close()
    return items, done_at - killed_at


def test_a_request_in_flight_ends_with_a_503_once_redis_is_gone_for_a_while(server):
    items, seconds = asyncio.run(in_flight(server, None))
    assert len(items) == 1 and items[0].error is not None, items
    assert items[0].error.code == 503 and "lost the connection to Redis" in items[0].error.message
    assert REDIS_LOST_S <= seconds < REDIS_LOST_S + 2


def test_a_request_in_flight_goes_on_when_redis_is_back_sooner(server):
    items, seconds = asyncio.run(in_flight(server, 2.0))
    assert [(i.error, i.text, i.finish_reason) for i in items] == [(None, "hello", "length")]
    assert seconds < REDIS_LOST_S


# ---- served ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("redis-supervision"), api_key=None, grpc=False)
    yield s
    stop_stack(s)


def redis_servers(stack) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(stack.proc.pid).children():
        try:
            if child.name() == "redis-server" and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            pass
    return found


def ready(stack) -> bool:
    try:
        with urllib.request.urlopen(f"{stack.base_url}/health/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


PROMPTS = ["Write a long story about a dragon.", "List the countries of Europe.", "Explain how a bicycle works."]
MAX_TOKENS = 48             # steps of tens of ms on a CPU: generation goes on while Redis is down (~1-2 s)


async def stream_all(stack, first_chunks: asyncio.Event | None = None) -> list[tuple[str, str, float]]:
    """The PROMPTS as greedy streams at once; each ends as ("done", text, when) or ("error", message, when).
    first_chunks is set once every stream has had two chunks."""
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    going = [0] * len(PROMPTS)

    async def one(i: int) -> tuple[str, str, float]:
        text = ""
        try:
            stream = await client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                text += chunk.choices[0].text if chunk.choices else ""
                going[i] += 1
                if first_chunks is not None and min(going) >= 2:
                    first_chunks.set()
            return "done", text, time.monotonic()
        except (openai.APIError, ValueError) as e:
            return "error", str(e), time.monotonic()

    try:
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
    finally:
        await client.close()


async def ready_again(stack, after: float) -> float:
    """When /health/ready first answers 200 from `after` on (a readiness answer is reused for 1 s: one from
    before Redis was back does not count)."""
    await asyncio.sleep(max(0.0, after - time.monotonic()))
    while not await asyncio.to_thread(ready, stack):
        await asyncio.sleep(0.5)
    return time.monotonic()


def test_streams_outlive_a_redis_killed_mid_stream(stack):
    undisturbed = asyncio.run(stream_all(stack))
    assert [o[0] for o in undisturbed] == ["done"] * len(PROMPTS), undisturbed
    services = {name: sorted(stack.service_pids(name)) for name in SERVICES}
    [victim] = redis_servers(stack)
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])

    async def scenario():
        started = asyncio.Event()
        streams = asyncio.create_task(stream_all(stack, started))
        await asyncio.wait_for(started.wait(), 60)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        readiness = asyncio.create_task(ready_again(stack, killed_at + 2))       # Redis is back after ~1 s
        outcomes = await asyncio.wait_for(streams, STREAMS_BOUND_S)             # none hangs
        return outcomes, killed_at, await asyncio.wait_for(readiness, READY_AGAIN_S + 5)

    outcomes, killed_at, ready_at = asyncio.run(scenario())
    for (kind, text, at), (_, want, _) in zip(outcomes, undisturbed):
        assert at - killed_at > 1.0, "ended before Redis was back: the test tests nothing"
        if kind == "done":
            assert text == want                                  # nothing lost, nothing repeated
        else:
            assert at - killed_at < ERROR_BOUND_S, (text, at - killed_at)
    assert any(kind == "done" for kind, _, _ in outcomes), outcomes  # back in about a second: they go on
    assert ready_at - killed_at < READY_AGAIN_S

    # Restarted on its port, with its password.
    [restarted] = redis_servers(stack)
    assert restarted.pid != victim.pid
    assert any(c.laddr.port == port for c in restarted.net_connections(kind="tcp") if c.status == "LISTEN")
    with redis.Redis.from_url(stack.redis_url) as client:
        assert client.ping()
    with pytest.raises(redis.AuthenticationError), anonymous(port) as client:
        client.ping()
    password = stack.redis_url.split(":")[2].split("@")[0]
    serve = psutil.Process(stack.proc.pid)
    for process in [serve, *serve.children(recursive=True)]:
        assert password not in " ".join(process.cmdline()), process.cmdline()
    # No service restarted: Redis going away is waited out, not a reason to exit.
    assert {name: sorted(stack.service_pids(name)) for name in SERVICES} == services
    exits = [line for line in stack.log().splitlines() if "exited with" in line]
    assert len(exits) == 1 and "redis-server" in exits[0], exits


def test_no_process_outlives_a_sigkilled_serve(stack):
    """Run last: it takes the module's stack down."""
    started = psutil.Process(stack.proc.pid).children(recursive=True)
    assert {p.name() for p in started} >= {"redis-server"} and len(started) >= 7   # + 5 services, the publisher
    [files] = [p.cwd() for p in started if p.name() == "redis-server"]     # it runs in its own directory
    stack.proc.kill()
    stack.proc.wait()
    _, alive = psutil.wait_procs(started, timeout=GONE_S)
    for process in alive:
        process.kill()
    assert not alive, [p.cmdline() for p in alive]
    shutil.rmtree(files, ignore_errors=True)                            # what serve would have removed
