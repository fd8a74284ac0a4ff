"""The gateway's end of the pipeline (asyncio): submit a request, stream its replies, abort it.

Shared by the HTTP gateway and the gRPC server. Each gateway instance has its own reply stream; one reader task
takes every Reply from it and hands each item to its request's queue, dropping repeats by (request, index, seq).
A watcher follows the scheduler's and the workers' heartbeats: when the scheduler dies or restarts, every request
in flight ends with a clear 503 error instead of hanging (a worker that dies loses no request: the scheduler moves
its requests to another worker); with no scheduler or no worker alive, new requests get a 503. Redis going away
ends nothing at first: the reader waits it out and goes on from the last reply it read; but once it has failed to
reach Redis for REDIS_LOST_S, every request in flight ends with a 503 error (and is aborted upstream once Redis is
back). The gateway has a heartbeat of its own, by which the scheduler knows when to abort a dead gateway's
requests; until then another gateway can take one over and continue its stream (resume; see services/resumable.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from schemas.codec import SchemaError, decode, encode
from schemas.messages import (RESUMED_ELSEWHERE, Abort, ErrorInfo, GenerateRequest, Reply, ReplyItem, Resume,
                              WorkerInfo)
from services.transport import (FIELD, HEARTBEAT_SECONDS, HEARTBEAT_TTL_MS, REDIS_DOWN, STREAM_MAXLEN, Names,
                                RedisOutage, connect_async, is_cluster_url, just_restarted, on_node_of, stream_id)

log = logging.getLogger("pagestream.pipeline_client")

REDIS_CONNECTIONS = 64
CLUSTER_CONNECTIONS_PER_NODE = 1024
READY_TTL_S = 1.0               # a readiness answer is reused this long: one probe a second, however many ask
# A resumed request the scheduler no longer holds may still have finished: its last items can be a moment behind
# the scheduler's answer. Past this, the answer stands.
RESUME_LINGER_S = 2.0
REDIS_LOST_S = 5.0              # Redis unreachable this long: every request in flight ends with an error
REPLY_BLOCK_MS = 1000           # the reply reader's XREAD waits this long for new replies


class Overloaded(Exception):
    """The gateway's admission queue is full (HTTP 429)."""


class Unavailable(Exception):
    """The pipeline cannot take requests right now: the scheduler or a worker is down (HTTP 503)."""


class StreamGone(Exception):
    """A stream to resume whose gateway's reply stream is gone: it ended long ago, or never was (HTTP 404)."""


@dataclass
class _InFlight:
    queue: asyncio.Queue
    scheduler_epoch: str | None           # the scheduler's when it was sent: another one never knew of it
    next_seq: dict[int, int] = field(default_factory=dict)     # completion index -> next expected seq
    open_indexes: int = 1                                       # completions not yet finished
    first_entry: bytes | None = None                            # the reply-stream entry of its first item
    resumed: bool = False             # taken over: its items come from a replay and a follower, in order

    def ends(self, item: ReplyItem) -> bool:
        """Count the item in; True if it is the request's last (an error, or its last completion's finish)."""
        if item.error is not None:
            return True
        if item.finish_reason is not None:
            self.open_indexes -= 1
        return self.open_indexes == 0


def _resumed_elsewhere(request_id: str) -> ReplyItem:
    return ReplyItem(request_id=request_id, error=ErrorInfo(
        "this stream was resumed on another connection", type=RESUMED_ELSEWHERE, code=409))


class PipelineClient:
    def __init__(self, redis_url: str, prefix: str = "ps", max_pending: int = 1024, gateway_id: str | None = None):
        # Requests wait for a free connection rather than fail when hundreds arrive at once; the reply reader
        # has its own, since its XREAD blocks.
        # One quick retry: a pooled connection that died with a restarted Redis is replaced at once, not a 503
        # (a repeated XADD is dropped downstream); a Redis that is gone fails at once (redis-py's default holds a
        # call for seconds). The reader's socket timeout: a Redis that stops answering is an outage too.
        retry = Retry(ExponentialWithJitterBackoff(cap=0.05, base=0.01), 1)
        self._pool: aioredis.BlockingConnectionPool | None = None      # opened at start; None under a cluster
        if is_cluster_url(redis_url):     # (redis-py's cluster client has no blocking pool: past its ceiling a
            self.redis = connect_async(redis_url, retry=retry,  # command fails, so the ceiling is set far above)
                                       max_connections=CLUSTER_CONNECTIONS_PER_NODE)
        else:
            self._pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=REDIS_CONNECTIONS,
                                                                  timeout=None, retry=retry)
            self.redis = aioredis.Redis(connection_pool=self._pool)
        self._reader = connect_async(redis_url, retry=retry, socket_timeout=REPLY_BLOCK_MS / 1000 + 2)
        self.redis_url = redis_url
        self.names = Names(prefix)
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:8]}"     # resumable.EventId parses this form
        self.reply_stream = self.names.reply(self.gateway_id)
        self.max_pending = max_pending
        self._inflight: dict[str, _InFlight] = {}
        self._scheduler_epoch: str | None = None      # as last seen (None: not alive)
        self._workers_alive = False                  # whether any worker's heartbeat was, when last looked
        self._tasks: list[asyncio.Task] = []
        self._followers: dict[str, _Follower] = {}       # another gateway's reply stream -> its follower
        self._ids = itertools.count()
        self._ready_cache: tuple[float, bool] = (-READY_TTL_S, False)     # (when checked, the answer)
        self._ready_check: asyncio.Task | None = None     # the probe in flight, which every caller awaits
        self.readiness_checks = 0                         # probes sent (in /metrics: that callers share them)
        self.last_reply_id: bytes | None = None          # how far the reply stream was read (its lag, in /metrics)
        # Set by close(): the background loops end even if their cancellation is lost (redis-py can lose one that
        # lands as it sends a command: the loop would go on reading for ever).
        self._closing = False

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._open_connections()
            await self._heartbeat_once()
            await self._check_liveness()
        except REDIS_DOWN as e:                             # not there yet: the watcher looks again
            RedisOutage("starting").failed(e)               # (a refused password is raised)
        self._tasks = [asyncio.create_task(self._read_replies(), name="replies"),
                       asyncio.create_task(self._watch(), name="liveness")]

    async def _open_connections(self) -> None:
        """Opens the request pool's connections before the gateway serves. Made on demand, each request of the first
        burst after a start would wait for a new connection: a connect and redis-py's handshake (CLIENT SETINFO),
        one after another on the event loop. 64 requests at once took 160-430 ms on a 2-core host that way, and
        6-30 ms with the connections open; on the H200 host the first burst's gateway -> tokenizer hop was 127 ms
        against 17 in the next. (A cluster client opens its connections per node as it goes.)"""
        if self._pool is None:
            return
        connections = await asyncio.gather(*(self._pool.get_connection() for _ in range(REDIS_CONNECTIONS)),
                                           return_exceptions=True)
        for connection in connections:
            if not isinstance(connection, BaseException):
                await self._pool.release(connection)
        if errors := [c for c in connections if isinstance(c, BaseException)]:
            raise errors[0]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks + ([self._ready_check] if self._ready_check else []):
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._ready_check] if self._ready_check else []),
                             return_exceptions=True)
        for follower in list(self._followers.values()):
            await follower.close()
        with contextlib.suppress(*REDIS_DOWN):          # Redis gone: the stream stays, trimmed (MAXLEN)
            await self.redis.delete(self.reply_stream, self.names.alive("gateway", self.gateway_id))
        await self.redis.aclose()
        await self._reader.aclose()

    @property
    def num_pending(self) -> int:
        return len(self._inflight)

    @property
    def pipeline_alive(self) -> bool:
        return self._scheduler_epoch is not None and self._workers_alive

    # ---- requests ------------------------------------------------------------------------------------------
    def new_request_id(self, kind: str = "cmpl") -> str:
        """Unique, and unguessable (128 random bits): a response id is what a client names to resume its stream."""
        return f"{kind}-{self.gateway_id}-{next(self._ids)}-{secrets.token_hex(16)}"

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[ReplyItem]]:
        """Submit and yield its reply items until every completion has finished (or an error item), in batches:
        the items that came in together (see _items). Leaving the iteration early (a client went away) aborts the
        request through the pipeline. Raises Overloaded, Unavailable, or ValueError (SchemaError: a field over
        its size limit; a request id in flight)."""
        if len(self._inflight) >= self.max_pending:
            raise Overloaded(f"{len(self._inflight)} requests in flight; try again later")
        await self._require_pipeline()
        if request.request_id in self._inflight:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        request.gateway = self.gateway_id
        request.epoch = self._scheduler_epoch or ""
        payload = encode(request)
        decode(GenerateRequest, payload)     # the schema's limits, checked here: a tokenizer could not answer it
        flight = _InFlight(asyncio.Queue(), self._scheduler_epoch, open_indexes=request.params.num_sequences)

        async def send() -> None:
            await self.redis.xadd(self.names.tokenize, {FIELD: payload}, maxlen=STREAM_MAXLEN, approximate=True)

        async with contextlib.aclosing(self._items(request.request_id, flight, send)) as batches:
            async for batch in batches:
                yield batch

    async def resume(self, origin: str, request_id: str, n: int, since: str) -> AsyncIterator[list[ReplyItem]]:
        """Take over a request that gateway `origin` started (its client came back with Last-Event-ID) and yield all
        its items (in batches, as generate does), from the first (the caller shows the client those it has not
        seen), until every completion has finished or an error item. The items come from the origin's reply
        stream, replayed from entry `since` and then followed; the scheduler makes this gateway the request's
        owner, tells the previous one to let go, and answers an error (404) if the request is no longer in flight:
        then the items already in the stream are served anyway, and the error only if they do not end the request
        within RESUME_LINGER_S (a request that just finished has its last items on their way). Leaving early
        aborts the request, as generate does. Raises Unavailable, or StreamGone: the origin's stream is gone."""
        await self._require_pipeline()
        origin_stream = self.names.reply(origin)
        try:
            if not await self.redis.exists(origin_stream):
                raise StreamGone(f"no stream {request_id} to resume: it ended, or was never started")
        except REDIS_DOWN as e:
            raise Unavailable(f"cannot reach Redis: {e}") from None
        previous = self._inflight.get(request_id)
        if previous is not None:            # an earlier connection to this gateway, broken unnoticed: it lets go
            previous.queue.put_nowait(_resumed_elsewhere(request_id))
        flight = _InFlight(asyncio.Queue(), self._scheduler_epoch, open_indexes=n, resumed=True)

        async def send() -> None:
            await self.redis.xadd(self.names.resume, {FIELD: encode(Resume(request_id, self.gateway_id))},
                                  maxlen=STREAM_MAXLEN, approximate=True)
            await self._follow(origin_stream, since, request_id)

        try:
            async with contextlib.aclosing(self._items(request_id, flight, send)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            self._unfollow(origin_stream, request_id)

    async def _items(self, request_id: str, flight: _InFlight, send) -> AsyncIterator[list[ReplyItem]]:
        """What generate and resume share: the flight registered, send() to start the request, then its items
        until it ends, in batches: all the items queued when the caller asks for more. While the caller keeps up
        that is one item, each step's token as it comes; a caller that fell behind (a gateway streaming a small
        model's 30,000 tokens a second) gets what piled up at once and sends it in one write, so falling behind
        makes the writes bigger rather than the lag longer. Leaving early aborts the request; Redis gone during
        send() is Unavailable (taken as nothing started: nothing to abort). A resumed request's 404 (the
        scheduler no longer holds it) waits RESUME_LINGER_S for items that may still end it (see resume)."""
        self._inflight[request_id] = flight
        done = False
        try:
            try:
                await send()
            except REDIS_DOWN as e:
                done = True
                raise Unavailable(f"cannot reach Redis: {e}") from None
            lost: ReplyItem | None = None       # the scheduler's answer that it no longer holds the request
            batch: list[ReplyItem] = []
            while not done:
                if lost is None:
                    item = await flight.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(flight.queue.get(), RESUME_LINGER_S)
                    except TimeoutError:
                        item = lost
                if flight.resumed and lost is None and item.error is not None and item.error.code == 404:
                    lost = item
                else:
                    done = flight.ends(item)
                    batch.append(item)
                if batch and (done or flight.queue.empty()):    # (a get from a queue with items never suspends)
                    yield batch
                    batch = []
        finally:
            self._let_go(request_id, flight)
            if not done:
                await self.abort(request_id)

    def first_reply_entry(self, request_ids: list[str]) -> str | None:
        """The earliest reply-stream entry holding an item of these requests so far (where a replay of them can
        start: items of theirs not yet read come later); None before any."""
        entries = [f.first_entry for rid in request_ids if (f := self._inflight.get(rid)) and f.first_entry]
        return min(entries, key=stream_id).decode() if entries else None

    async def _require_pipeline(self) -> None:
        if not self.pipeline_alive:               # perhaps only not seen yet: this gateway looks twice a second
            with contextlib.suppress(redis.RedisError, OSError):
                await self._check_liveness()
        if not self.pipeline_alive:
            raise Unavailable("the scheduler or every worker is not running")

    def _let_go(self, request_id: str, flight: _InFlight) -> None:
        if self._inflight.get(request_id) is flight:      # not a newer connection's, which took the request over
            del self._inflight[request_id]

    async def abort(self, request_id: str) -> None:
        try:
            await self.redis.xadd(self.names.abort, {FIELD: encode(Abort(request_id))}, maxlen=STREAM_MAXLEN,
                                  approximate=True)
        except Exception:                                   # best effort: the pipeline may be gone
            log.exception("could not send abort for %s", request_id)

    async def worker_info(self) -> WorkerInfo | None:
        """What a live worker registered at its start (the model's max_model_len, its KV blocks, ...); None: none
        yet, or Redis cannot say."""
        try:
            for worker in await self._live_workers():
                raw = await self.redis.get(self.names.worker_info(worker))
                if raw:
                    return decode(WorkerInfo, raw)
            return None
        except (redis.RedisError, OSError, SchemaError) as e:
            log.warning("could not read the worker's registration: %s", e)
            return None

    # ---- readiness: a real round trip ----------------------------------------------------------------------
    async def ready(self, timeout_s: float = 10.0) -> bool:
        """True if a one-token request made it through every service in time. The probe is admitted ahead of
        every waiting request: a busy server with a queue is ready (it takes requests; a client that finds the
        queue full gets a 429), and a load balancer that took it out of rotation for its queue would pile its
        load onto the others. Health checks can come from many load balancers at once, and each probe is a
        generation: so the answer is reused for READY_TTL_S, and
        while a probe runs every caller awaits that one (shielded: a caller that gives up does not cancel it
        for the others)."""
        checked_at, ok = self._ready_cache
        if time.monotonic() - checked_at < READY_TTL_S:
            return ok
        if self._ready_check is None:
            self._ready_check = asyncio.create_task(self._probe(timeout_s), name="readiness")
        return await asyncio.shield(self._ready_check)

    async def _probe(self, timeout_s: float) -> bool:
        self.readiness_checks += 1
        ok = False
        try:
            if self.pipeline_alive:
                from schemas.sampling_params import SamplingParams
                probe = GenerateRequest(request_id=self.new_request_id("ready"), gateway=self.gateway_id,
                                        params=SamplingParams(max_tokens=1, temperature=0.0), arrival=time.time(),
                                        prompt="ping", probe=True)
                async with asyncio.timeout(timeout_s):
                    async for batch in self.generate(probe):
                        ok = batch[-1].error is None
        except (TimeoutError, Overloaded, Unavailable, redis.RedisError, OSError) as e:
            log.warning("readiness probe failed: %s", e)
            ok = False
        finally:
            self._ready_cache = (time.monotonic(), ok)
            self._ready_check = None
        return ok

    # ---- background tasks ----------------------------------------------------------------------------------
    async def _read_replies(self) -> None:
        last_id = b"0-0"          # this gateway's own stream, from its start: a reply sent early is not missed
        outage = RedisOutage(f"reading {self.reply_stream}")
        lost: set[str] = set()                              # requests ended because Redis is gone
        while not self._closing:
            try:
                streams = await self._reader.xread({self.reply_stream: last_id}, count=256, block=REPLY_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as e:
                delay = outage.failed(e)
                if outage.down_for >= REDIS_LOST_S:
                    self._end_lost(lost, outage.down_for)
                await asyncio.sleep(delay)
                continue
            except Exception:
                log.exception("reading %s failed; retrying", self.reply_stream)
                await asyncio.sleep(0.5)
                continue
            outage.recovered()
            if lost:              # what they hold upstream is freed (the abort of each, best effort)
                await asyncio.gather(*(self.abort(request_id) for request_id in lost))
                lost.clear()
            took = time.time()                              # every item's gateway_took stamp
            for _, entries in streams or []:
                for entry_id, fields in entries:
                    last_id = self.last_reply_id = entry_id
                    self._take_entry(entry_id, fields, took)

    def _end_lost(self, lost: set[str], seconds: float) -> None:
        """End every request in flight (once each) with a 503: Redis has been unreachable for `seconds`."""
        error = ErrorInfo(f"lost the connection to Redis for {seconds:.0f} s while this request was in flight; "
                          f"please retry", type="service_unavailable", code=503)
        for request_id, flight in list(self._inflight.items()):
            if request_id not in lost:
                lost.add(request_id)
                flight.queue.put_nowait(ReplyItem(request_id=request_id, error=error))

    def _take_entry(self, entry_id: bytes, fields: dict, took: float, taken_over: set[str] | None = None) -> None:
        """Hand each item of a reply-stream entry to its request. taken_over: the entry is another gateway's,
        and only these requests' items are ours; they go without their hop stamps (the hops were that
        gateway's), and without the error that tells that gateway to let go."""
        try:
            reply = decode(Reply, fields[FIELD])
        except (SchemaError, KeyError) as e:
            log.error("dropping a malformed reply %s: %s", entry_id, e)
            return
        for item in reply.items:
            if taken_over is not None:
                if item.request_id not in taken_over or (item.error and item.error.type == RESUMED_ELSEWHERE):
                    continue
                item.stamps = []
            elif item.stamps:
                item.stamps.append(took)
            self._dispatch(item, entry_id, replayed=taken_over is not None)

    async def _follow(self, stream: str, since: str, request_id: str) -> None:
        """Replay request_id's items in another gateway's reply stream from entry `since` on, then leave the rest
        to that stream's follower. The replay reads until it has caught up with the follower (which may have
        read further meanwhile): so no entry falls between the two, and the replayed items come first."""
        start = stream_id(since)
        last = (start[0], start[1] - 1) if start[1] else (start[0] - 1, 2 ** 64 - 1)     # just before `since`
        empty_reads = 0
        while True:
            entries = await self.redis.xrange(stream, min=f"{start[0]}-{start[1]}", max="+", count=1024)
            for entry_id, fields in entries:
                self._take_entry(entry_id, fields, 0.0, {request_id})
            if entries:
                last = stream_id(entries[-1][0])
                start = (last[0], last[1] + 1)
            if len(entries) == 1024:
                continue
            follower = self._followers.get(stream)
            if follower is None:
                follower = self._followers[stream] = _Follower(self, stream, f"{last[0]}-{last[1]}")
            empty_reads += not entries
            # (Twice nothing: the follower's entries are gone from the stream, there is nothing left to replay.)
            if stream_id(follower.position) <= last or empty_reads == 2:
                follower.requests.add(request_id)
                return

    def _unfollow(self, stream: str, request_id: str) -> None:
        follower = self._followers.get(stream)
        if follower is not None:
            follower.requests.discard(request_id)
            if not follower.requests:
                del self._followers[stream]
                asyncio.ensure_future(follower.close())

    def _dispatch(self, item: ReplyItem, entry_id: bytes, replayed: bool = False) -> None:
        flight = self._inflight.get(item.request_id)
        if flight is None:                                  # finished, aborted, or another gateway's
            return
        if flight.resumed and not replayed and item.error is None:
            return          # taken over from this gateway itself: the replay must come first, then the follower
        if flight.first_entry is None:
            flight.first_entry = entry_id
        expected = flight.next_seq.get(item.index, 0)
        if item.error is None and item.seq < expected:      # delivered twice
            return
        flight.next_seq[item.index] = item.seq + 1
        flight.queue.put_nowait(item)

    async def _watch(self) -> None:
        outage = RedisOutage("watching the heartbeats")
        while not self._closing:
            await asyncio.sleep(HEARTBEAT_SECONDS / 2)
            try:
                await self._heartbeat_once()
                await self._check_liveness()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as e:                         # the reader ends requests if this lasts
                outage.failed(e)
                continue
            except Exception:
                log.exception("liveness check failed")
            outage.recovered()

    async def _heartbeat_once(self) -> None:
        """This gateway is alive (where: host and pid). The scheduler aborts a dead gateway's requests once the
        grace period for resuming them is over."""
        await self.redis.set(self.names.alive("gateway", self.gateway_id), f"{socket.gethostname()}:{os.getpid()}",
                             px=HEARTBEAT_TTL_MS)

    async def _live_workers(self) -> list[str]:
        names = sorted(m.decode() for m in await self.redis.smembers(self.names.workers))
        beats = await self.redis.mget([self.names.alive("worker", n) for n in names]) if names else []
        return [name for name, beat in zip(names, beats) if beat is not None]

    async def _check_liveness(self) -> None:
        beat = await self.redis.get(self.names.alive("scheduler"))
        scheduler, workers_alive = beat.decode() if beat else None, bool(await self._live_workers())
        if (scheduler is None or not workers_alive) and (scheduler, workers_alive) != (
                self._scheduler_epoch, self._workers_alive) and just_restarted(
                await self.redis.info("server", **on_node_of(self.redis, self.names.alive("scheduler")))):
            # Heartbeats that expired while Redis was down: the services beat again in a moment (not dead).
            scheduler, workers_alive = scheduler or self._scheduler_epoch, workers_alive or self._workers_alive
        self._scheduler_epoch, self._workers_alive = scheduler, workers_alive
        for request_id, flight in list(self._inflight.items()):
            if flight.scheduler_epoch != scheduler:
                what = "stopped" if scheduler is None else "restarted"
                error = ErrorInfo(f"the scheduler {what} while this request was in flight; please retry",
                                  type="service_unavailable", code=503)
                flight.queue.put_nowait(ReplyItem(request_id=request_id, error=error))
                flight.scheduler_epoch = scheduler         # one error is enough


class _Follower:
    """Follows another gateway's reply stream for the requests this gateway took over from it: one reader, with
    a connection of its own (its XREAD blocks), per stream however many requests."""

    def __init__(self, client: PipelineClient, stream: str, position: str):
        self.client, self.stream, self.position = client, stream, position
        self.requests: set[str] = set()
        self.redis = connect_async(client.redis_url)
        self.task = asyncio.create_task(self._run(), name=f"follow {stream}")

    async def _run(self) -> None:
        while True:
            try:
                streams = await self.redis.xread({self.stream: self.position}, count=256, block=1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading %s failed; retrying", self.stream)
                await asyncio.sleep(0.5)
                continue
            for _, entries in streams or []:
                for entry_id, fields in entries:
                    self.position = entry_id.decode()
                    self.client._take_entry(entry_id, fields, 0.0, self.requests)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.redis.aclose()
