"""The gateway's end of the pipeline (asyncio): submit a request, stream its replies, abort it.

Shared by the HTTP gateway and the gRPC server. Each gateway instance has its own reply stream; one reader task
takes every Reply from it and hands each item to its request's queue, dropping repeats by (request, index, seq).
A watcher follows the scheduler's and the worker's heartbeats: when either dies or restarts, every request
in flight ends with a clear 503 error instead of hanging. Redis going away ends nothing at first: the reader
waits it out and goes on from the last reply it read; but once it has failed to reach Redis for REDIS_LOST_S,
every request in flight ends with a 503 error (and is aborted upstream once Redis is back).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from schemas.codec import SchemaError, decode, encode
from schemas.messages import Abort, ErrorInfo, GenerateRequest, Reply, ReplyItem, WorkerInfo
from services.transport import (FIELD, HEARTBEAT_SECONDS, REDIS_DOWN, STREAM_MAXLEN, Names, RedisOutage,
                                just_restarted)

log = logging.getLogger("pagestream.pipeline_client")

REDIS_CONNECTIONS = 64
READY_TTL_S = 1.0               # a readiness answer is reused this long: one probe a second, however many ask
REDIS_LOST_S = 5.0              # Redis unreachable this long: every request in flight ends with an error
REPLY_BLOCK_MS = 1000           # the reply reader's XREAD waits this long for new replies


class Overloaded(Exception):
    """The gateway's admission queue is full (HTTP 429)."""


class Unavailable(Exception):
    """The pipeline cannot take requests right now: the scheduler or a worker is down (HTTP 503)."""


@dataclass
class _InFlight:
    queue: asyncio.Queue
    epochs: tuple
    next_seq: dict[int, int] = field(default_factory=dict)     # completion index -> next expected seq
    open_indexes: int = 1                                       # completions not yet finished


class PipelineClient:
    def __init__(self, redis_url: str, prefix: str = "ps", worker: str = "w0", max_pending: int = 1024,
                 gateway_id: str | None = None):
        # Requests wait for a free connection rather than fail when hundreds arrive at once; the reply reader
        # has its own, since its XREAD blocks.
        # One quick retry: a pooled connection that died with a restarted Redis is replaced at once, not a 503
        # (a repeated XADD is dropped downstream); a Redis that is gone fails at once (redis-py's default holds a
        # call for seconds). The reader's socket timeout: a Redis that stops answering is an outage too.
        retry = Retry(ExponentialWithJitterBackoff(cap=0.05, base=0.01), 1)
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=REDIS_CONNECTIONS, timeout=None, retry=retry))
        self._reader = aioredis.Redis.from_url(redis_url, retry=retry, socket_timeout=REPLY_BLOCK_MS / 1000 + 2)
        self.names = Names(prefix)
        self.worker = worker
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:8]}"
        self.reply_stream = self.names.reply(self.gateway_id)
        self.max_pending = max_pending
        self._inflight: dict[str, _InFlight] = {}
        self._epochs: tuple = (None, None)           # (scheduler epoch, worker epoch) as last seen
        self._tasks: list[asyncio.Task] = []
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
            await self._check_liveness()
        except REDIS_DOWN as e:                             # not there yet: the watcher looks again
            RedisOutage("starting").failed(e)               # (a refused password is raised)
        self._tasks = [asyncio.create_task(self._read_replies(), name="replies"),
                       asyncio.create_task(self._watch(), name="liveness")]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks + ([self._ready_check] if self._ready_check else []):
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._ready_check] if self._ready_check else []),
                             return_exceptions=True)
        with contextlib.suppress(*REDIS_DOWN):          # Redis gone: the stream stays, trimmed (MAXLEN)
            await self.redis.delete(self.reply_stream)
        await self.redis.aclose()
        await self._reader.aclose()

    @property
    def num_pending(self) -> int:
        return len(self._inflight)

    @property
    def pipeline_alive(self) -> bool:
        return None not in self._epochs

    # ---- requests ------------------------------------------------------------------------------------------
    def new_request_id(self, kind: str = "cmpl") -> str:
        return f"{kind}-{self.gateway_id}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    async def generate(self, request: GenerateRequest) -> AsyncIterator[ReplyItem]:
        """Submit and yield its reply items until every completion has finished (or an error item). Leaving
        the iteration early (a client went away) aborts the request through the pipeline. Raises Overloaded,
        Unavailable, or ValueError (SchemaError: a field over its size limit; a request id in flight)."""
        if len(self._inflight) >= self.max_pending:
            raise Overloaded(f"{len(self._inflight)} requests in flight; try again later")
        if not self.pipeline_alive:               # perhaps only not seen yet: this gateway looks twice a second
            with contextlib.suppress(redis.RedisError, OSError):
                await self._check_liveness()
        if not self.pipeline_alive:
            raise Unavailable("the scheduler or the worker is not running")
        if request.request_id in self._inflight:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        request.gateway = self.gateway_id
        request.epoch = self._epochs[0] or ""
        payload = encode(request)
        decode(GenerateRequest, payload)     # the schema's limits, checked here: a tokenizer could not answer it
        flight = _InFlight(asyncio.Queue(), self._epochs, open_indexes=request.params.n)
        self._inflight[request.request_id] = flight
        done = False
        try:
            try:
                await self.redis.xadd(self.names.tokenize, {FIELD: payload}, maxlen=STREAM_MAXLEN, approximate=True)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                done = True                                   # nothing was sent: nothing to abort
                raise Unavailable(f"cannot reach Redis: {e}") from None
            while not done:
                item: ReplyItem = await flight.queue.get()
                if item.error is not None:
                    done = True
                elif item.finish_reason is not None:
                    flight.open_indexes -= 1
                    done = flight.open_indexes == 0
                yield item
        finally:
            self._inflight.pop(request.request_id, None)
            if not done:
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        try:
            await self.redis.xadd(self.names.abort, {FIELD: encode(Abort(request_id))}, maxlen=STREAM_MAXLEN,
                                  approximate=True)
        except Exception:                                   # best effort: the pipeline may be gone
            log.exception("could not send abort for %s", request_id)

    async def worker_info(self) -> WorkerInfo | None:
        """What the worker registered at its start (its max_model_len, KV blocks, ...); None: not yet, or Redis
        cannot say."""
        try:
            raw = await self.redis.get(self.names.worker_info(self.worker))
            return decode(WorkerInfo, raw) if raw else None
        except (redis.RedisError, OSError, SchemaError) as e:
            log.warning("could not read the worker's registration: %s", e)
            return None

    # ---- readiness: a real round trip ----------------------------------------------------------------------
    async def ready(self, timeout_s: float = 10.0) -> bool:
        """True if a one-token request made it through every service in time. Health checks can come from many
        load balancers at once, and each probe is a generation: so the answer is reused for READY_TTL_S, and
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
                                        prompt="ping")
                async with asyncio.timeout(timeout_s):
                    async for item in self.generate(probe):
                        ok = item.error is None
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
                    try:
                        reply = decode(Reply, fields[FIELD])
                    except (SchemaError, KeyError) as e:
                        log.error("dropping a malformed reply %s: %s", entry_id, e)
                        continue
                    for item in reply.items:
                        if item.stamps:
                            item.stamps.append(took)
                        self._dispatch(item)

    def _end_lost(self, lost: set[str], seconds: float) -> None:
        """End every request in flight (once each) with a 503: Redis has been unreachable for `seconds`."""
        error = ErrorInfo(f"lost the connection to Redis for {seconds:.0f} s while this request was in flight; "
                          f"please retry", type="service_unavailable", code=503)
        for request_id, flight in list(self._inflight.items()):
            if request_id not in lost:
                lost.add(request_id)
                flight.queue.put_nowait(ReplyItem(request_id=request_id, error=error))

    def _dispatch(self, item: ReplyItem) -> None:
        flight = self._inflight.get(item.request_id)
        if flight is None:                                  # finished, aborted, or another gateway's
            return
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
                await self._check_liveness()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as e:                         # the reader ends requests if this lasts
                outage.failed(e)
                continue
            except Exception:
                log.exception("liveness check failed")
            outage.recovered()

    async def _check_liveness(self) -> None:
        values = await self.redis.mget(self.names.alive("scheduler"), self.names.alive("worker", self.worker))
        epochs = tuple(v.decode() if v else None for v in values)
        if None in epochs and epochs != self._epochs and just_restarted(await self.redis.info("server")):
            # Heartbeats that expired while Redis was down: the services beat again in a moment (not dead).
            epochs = tuple(old if new is None else new for new, old in zip(epochs, self._epochs))
        self._epochs = epochs
        for request_id, flight in list(self._inflight.items()):
            if flight.epochs != self._epochs:
                which = "scheduler" if flight.epochs[0] != self._epochs[0] else "worker"
                what = "stopped" if self._epochs[0 if which == "scheduler" else 1] is None else "restarted"
                error = ErrorInfo(f"the {which} {what} while this request was in flight; please retry",
                                  type="service_unavailable", code=503)
                flight.queue.put_nowait(ReplyItem(request_id=request_id, error=error))
                flight.epochs = self._epochs           # one error is enough
