"""Resumable streams (services/resumable.py), through `pagestream serve` with two gateways on the default model: a
client whose gateway is killed mid-stream sends its request again with Last-Event-ID and gets the rest of its
text, each token once; a stream taken over on another connection ends on the old one without being cancelled; a
dead gateway's request nobody resumes is aborted after the grace period, and its reply stream deleted; a
Last-Event-ID that is not one of ours is a clear 4xx. And the gateway's end of a stream (PipelineClient) on a real
redis-server: items that came in together are handed over together; replayed and followed, each comes once."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import AsyncIterator

import httpx
import pytest
import redis

from conftest import start_stack, stop_stack
from schemas.codec import decode, encode
from schemas.messages import GenerateRequest, Reply, ReplyItem, Resume
from schemas.sampling_params import SamplingParams
from services.pipeline_client import PipelineClient
from services.resumable import parse_event_id
from services.transport import FIELD, Names, connect

MODEL = "smollm2-135m-instruct"
GRACE_S = 4.0
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("resume"), "--gateways", "2", "--resume-grace", str(GRACE_S),
                    grpc=False)
    yield s
    stop_stack(s)


def body(max_tokens: int) -> dict:
    return {"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


class Events:
    """A stream's events as a client sees them: an event counts once its blank line came (an event cut off by a
    broken connection is dropped, as EventSource does)."""

    def __init__(self):
        self.events: list[tuple[str | None, str]] = []     # (id, data)
        self.broken = False

    @property
    def last_id(self) -> str | None:
        return next((i for i, _ in reversed(self.events) if i is not None), None)

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(d) for _, d in self.events if d != "[DONE]"]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c.get("choices"))

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1][1] == "[DONE]"


def read_events(stack, payload: dict, headers: dict | None = None, on_event=None, expect: int = 200) -> Events:
    """POST a streamed chat completion and read its events until [DONE] or until the connection breaks;
    on_event(events) sees each as it comes."""
    out, event_id, data = Events(), None, []
    headers = {"Authorization": f"Bearer {stack.api_key}", **(headers or {})}
    try:
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=payload, headers=headers,
                          timeout=120) as response:
            assert response.status_code == expect, response.read()
            for line in response.iter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line == "" and data:
                    out.events.append((event_id, "\n".join(data)))
                    event_id, data = None, []
                    if on_event is not None:
                        on_event(out)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        out.broken = True
    return out


def gateway_pid(stack, response_id: str) -> int:
    """The pid of the gateway that made a response id: its heartbeat says where it runs (host:pid)."""
    gateway = parse_event_id(f"{response_id}/0-0/0").gateway
    beat = redis.Redis.from_url(stack.redis_url).get(Names(stack.prefix).alive("gateway", gateway))
    return int(beat.decode().rsplit(":", 1)[1])


def kill_gateway_after(n: int, stack):
    """An on_event that kills the stream's gateway (kill -9) once n content chunks came."""
    def on_event(events: Events) -> None:
        if len(events.chunks) == n:
            os.kill(gateway_pid(stack, events.chunks[0]["id"]), signal.SIGKILL)
    return on_event


# ---- the gateway's end, on a real redis-server; the test plays the detokenizer (and no scheduler answers) --------
def pipeline_up(r, names: Names) -> None:
    """What PipelineClient checks before it sends a request: a scheduler and a worker alive."""
    r.set(names.alive("scheduler"), "s")
    r.set(names.alive("worker", "w0"), "w")
    r.sadd(names.workers, "w0")


def publish(r, stream: str, request_id: str, seqs: list[int], finish: bool = False) -> str:
    """One reply-stream entry holding the request's items of these seqs, as a detokenizer writes it."""
    items = [ReplyItem(request_id=request_id, seq=s, text=f"<{s}>", token_ids=[s],
                       finish_reason="length" if finish and s == seqs[-1] else None) for s in seqs]
    return r.xadd(stream, {FIELD: encode(Reply(items))}).decode()


def test_items_that_came_in_together_are_handed_over_together(any_redis_url):
    """PipelineClient.generate hands its caller every item queued when it asks: one at a time while the caller
    keeps up (each step's token as it comes), and all that piled up in one batch when it fell behind (the
    gateway writes a batch to its client at once), in order, each once."""
    names = Names(f"batches{os.getpid()}")
    r = connect(any_redis_url)
    pipeline_up(r, names)

    async def scenario() -> None:
        client = PipelineClient(any_redis_url, names.prefix)
        await client.start()
        try:
            request = GenerateRequest(request_id=client.new_request_id(), gateway="",
                                      params=SamplingParams(max_tokens=8), arrival=time.time(), prompt="hi")
            rid, stream = request.request_id, client.reply_stream
            batches = client.generate(request)
            first = asyncio.create_task(anext(batches))
            await asyncio.sleep(0.2)                               # sent; the caller waits for its first item
            publish(r, stream, rid, [0, 1, 2])                     # one entry: handed over at once
            assert [i.seq for i in await asyncio.wait_for(first, 10)] == [0, 1, 2]
            publish(r, stream, rid, [3])
            assert [i.seq for i in await asyncio.wait_for(anext(batches), 10)] == [3]
            publish(r, stream, rid, [4])                           # two entries while the caller was busy
            publish(r, stream, rid, [5, 6, 7], finish=True)
            await asyncio.sleep(0.3)
            last = await asyncio.wait_for(anext(batches), 10)
            assert [i.seq for i in last] == [4, 5, 6, 7] and last[-1].finish_reason == "length"
            assert await anext(batches, None) is None
        finally:
            await client.close()

    asyncio.run(scenario())


def test_replay_then_follow_gives_each_item_once_in_order(any_redis_url):
    """A request taken over from another gateway: its items already in that gateway's reply stream are replayed
    from `since`, later ones followed as they come, in order, each once, other requests' items left out; the
    scheduler is told (Resume). Taken over from this gateway itself (a connection that broke unnoticed), the
    earlier connection gets the error that lets it go, and nothing is aborted."""
    names = Names(f"replay{os.getpid()}")
    r = connect(any_redis_url)
    pipeline_up(r, names)

    async def collect(batches: AsyncIterator[list[ReplyItem]], into: list) -> None:
        async for items in batches:
            into += items

    async def scenario() -> None:
        client = PipelineClient(any_redis_url, names.prefix)
        await client.start()
        try:
            origin = names.reply("gw-0a1b2c3d")
            publish(r, origin, "r", [0])                              # before `since`: never the client's
            since = publish(r, origin, "r", [1, 2])
            publish(r, origin, "other", [0, 1])
            publish(r, origin, "r", [3, 4])
            got: list[ReplyItem] = []
            task = asyncio.create_task(collect(client.resume("gw-0a1b2c3d", "r", 1, since), got))
            await asyncio.sleep(0.3)
            publish(r, origin, "r", [4, 5])                           # a repeat, then new
            publish(r, origin, "r", [6, 7], finish=True)
            await asyncio.wait_for(task, 10)
            assert [(i.seq, i.text) for i in got] == [(s, f"<{s}>") for s in range(1, 8)]
            assert decode(Resume, r.xrange(names.resume)[-1][1][FIELD]) == Resume("r", client.gateway_id)

            request = GenerateRequest(request_id=client.new_request_id("chatcmpl"), gateway="",
                                      params=SamplingParams(max_tokens=8), arrival=time.time(), prompt="hi")
            old: list[ReplyItem] = []
            old_task = asyncio.create_task(collect(client.generate(request), old))
            await asyncio.sleep(0.1)
            since = publish(r, client.reply_stream, request.request_id, [0, 1, 2])
            await asyncio.sleep(0.3)
            new: list[ReplyItem] = []
            new_task = asyncio.create_task(collect(client.resume(client.gateway_id, request.request_id, 1, since),
                                                   new))
            await asyncio.sleep(0.1)
            publish(r, client.reply_stream, request.request_id, [3, 4, 5, 6, 7], finish=True)
            await asyncio.wait_for(asyncio.gather(old_task, new_task), 10)
            assert [i.seq for i in old[:-1]] == [0, 1, 2] and old[-1].error.code == 409
            assert [i.seq for i in new] == list(range(8)) and new[-1].finish_reason == "length"
            assert r.xlen(names.abort) == 0
        finally:
            await client.close()

    asyncio.run(scenario())


def test_resumed_events_are_only_those_past_each_choices_cursor(any_redis_url):
    """Through the gateway's HTTP app: a stream of n=2 choices resumed from cursor 2.1 shows choice 0's items
    from seq 2 and choice 1's from seq 1, no role chunks, each event's id advancing that choice's cursor, and a
    usage chunk counting every token (the replay fed the builder all of them), with the id that says done."""
    from services.gateway import GatewaySettings, build_app

    names = Names(f"cursor{os.getpid()}")
    r = connect(any_redis_url)
    pipeline_up(r, names)
    response_id = "chatcmpl-gw-0a1b2c3d-5-" + "ab" * 16
    origin = names.reply("gw-0a1b2c3d")
    since = None
    for index, seq, last in [(0, 0, False), (1, 0, False), (0, 1, False), (1, 1, False), (0, 2, False),
                             (1, 2, True), (0, 3, True)]:
        item = ReplyItem(request_id=response_id, index=index, seq=seq, text=f"{'ab'[index]}{seq}", token_ids=[7],
                         finish_reason="length" if last else None, prompt_tokens=5 if seq == 0 else 0)
        entry = r.xadd(origin, {FIELD: encode(Reply([item]))}).decode()
        since = since or entry

    async def resume() -> list[tuple[str, dict]]:
        client = PipelineClient(any_redis_url, names.prefix)
        await client.start()
        try:
            app = build_app(client, GatewaySettings("m", "m"))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True,
                        "stream_options": {"include_usage": True}}
                response = await http.post("/v1/chat/completions", json=body,
                                           headers={"Last-Event-ID": f"{response_id}/{since}/2.1"})
            assert response.status_code == 200, response.text
            events = []
            for block in response.text.split("\n\n"):
                fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
                if fields.get("data", "[DONE]") != "[DONE]":
                    events.append((fields.get("id"), json.loads(fields["data"])))
            return events
        finally:
            await client.close()

    events = asyncio.run(resume())
    shown = [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content")) for _, c in events if c["choices"]]
    assert shown == [(1, "b1"), (0, "a2"), (1, "b2"), (0, "a3")]                   # in the stream's order
    assert [i.rsplit("/", 1)[1] for i, _ in events] == ["2.2", "3.2", "3.3", "4.3", "done"]
    assert events[-1][1]["usage"]["completion_tokens"] == 7 and events[-1][1]["usage"]["prompt_tokens"] == 5


# ---- through `pagestream serve` ------------------------------------------------------------------------------------
def test_stream_goes_on_after_its_gateway_is_killed(stack):
    undisturbed = read_events(stack, body(40))
    assert undisturbed.done and not undisturbed.broken
    assert all(i is not None for i, d in undisturbed.events if d != "[DONE]")       # every event has an id

    first = read_events(stack, body(40), on_event=kill_gateway_after(10, stack))
    assert first.broken and not first.done, "the gateway was killed before the stream ended"
    rest = read_events(stack, body(40), {"Last-Event-ID": first.last_id})
    assert rest.done and not rest.broken
    assert first.text + rest.text == undisturbed.text                 # each token once, none lost
    assert not any(c["choices"] and "role" in c["choices"][0]["delta"] for c in rest.chunks)
    # The replay rebuilt the whole response: the usage counts every token, the id is the original response's.
    usage, reference = rest.chunks[-1]["usage"], undisturbed.chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (reference["prompt_tokens"], 40)
    assert {c["id"] for c in first.chunks + rest.chunks} == {first.chunks[0]["id"]}
    assert parse_event_id(rest.last_id).cursor is None                # the usage chunk's id: nothing is left


def test_resuming_on_another_connection_takes_the_stream_over(stack):
    """The old connection (a network that broke without its gateway noticing) gets an error event and lets go;
    the request is not cancelled: the new connection gets the rest."""
    taken_over: dict = {}

    def resume_elsewhere(events: Events) -> None:
        if len(events.chunks) == 5 and not taken_over:
            taken_over["rest"] = read_events(stack, body(40), {"Last-Event-ID": events.last_id})

    old = read_events(stack, body(40), on_event=resume_elsewhere)
    rest = taken_over["rest"]
    assert rest.done and len(rest.text) > 0
    assert rest.chunks[-1]["usage"]["completion_tokens"] == 40
    error = json.loads(next(d for _, d in old.events if '"error"' in d))["error"]
    assert error["code"] == 409 and "resumed" in error["message"]


def test_dead_gateways_request_is_aborted_after_the_grace_period(stack):
    r = redis.Redis.from_url(stack.redis_url)
    stats = Names(stack.prefix).scheduler_stats
    first = read_events(stack, body(2000), on_event=kill_gateway_after(3, stack))
    assert first.broken
    gateway = parse_event_id(first.last_id).gateway
    killed = time.monotonic()
    # The scheduler publishes its stats every half second: first see the request running (it must be: the grace
    # period has not passed), or a stale 0 from before it was admitted would end the wait below at once.
    while int(r.hget(stats, "running") or 0) == 0:
        assert time.monotonic() - killed < GRACE_S - 1.5, "the request was never seen running"
        time.sleep(0.05)
    while int(r.hget(stats, "running") or 0) > 0:                    # 2,000 tokens would take a minute or more
        assert time.monotonic() - killed < GRACE_S + 10, "the orphaned request was not aborted"
        time.sleep(0.2)
    assert time.monotonic() - killed >= GRACE_S - 1.5                 # not before the grace period (less the TTL)
    late = read_events(stack, body(2000), {"Last-Event-ID": first.last_id})
    error = json.loads(next(d for _, d in late.events if '"error"' in d))["error"]   # the rest, then why it ended
    assert error["code"] == 404 and "no longer running" in error["message"]
    while r.exists(Names(stack.prefix).reply(gateway)):
        assert time.monotonic() - killed < GRACE_S + 35, "the dead gateway's reply stream was not deleted"
        time.sleep(0.5)


@pytest.mark.parametrize("last_event_id, changes, status, says", [
    ("3", {}, 400, "not the id of an event"),
    ("chatcmpl-gw-0a1b2c3d-1-" + "0" * 32 + "/1-0/4", {}, 404, "no stream"),
    ("chatcmpl-gw-0a1b2c3d-1-" + "0" * 32 + "/1-0/4", {"stream": False, "stream_options": None}, 400,
     "stream set to true"),
    ("chatcmpl-gw-0a1b2c3d-1-" + "0" * 32 + "/1-0/4.4", {}, 400, "2 choices"),
])
def test_last_event_id_that_is_not_ours_is_refused(stack, last_event_id, changes, status, says):
    payload = {k: v for k, v in {**body(5), **changes}.items() if v is not None}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=payload, timeout=30,
                          headers={"Authorization": f"Bearer {stack.api_key}", "Last-Event-ID": last_event_id})
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200
