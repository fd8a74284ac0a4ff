"""Redis streams as the pipeline's wires.

One stream per hop, one consumer group per service type. A consumer acknowledges (XACK) an entry in the same
MULTI/EXEC transaction that writes its effect downstream, so an entry is either fully handled or not at all; a
consumer that dies leaves its entries pending, and a live one of the same group reclaims them (XAUTOCLAIM) after
they sat idle for a while. An entry delivered more than MAX_DELIVERIES times (a poison message) goes to the
dead-letter stream instead of being retried forever. Every XADD trims its stream (MAXLEN ~), and each consuming
service trims what its group has acknowledged (Trimmer), so a stream holds only what is still to be handled.
The dead-letter stream keeps a message's first bytes and its length, not the message: Redis's memory stays
bounded whatever is sent.

All names live under a prefix, so several deployments (or tests) can share one Redis.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import zlib
from dataclasses import dataclass

import redis

from schemas.codec import SchemaError, decode, encode
from schemas.messages import ErrorInfo, Reply, ReplyItem, WorkerInfo

log = logging.getLogger("pagestream.transport")

MAX_DELIVERIES = 5
STREAM_MAXLEN = 100_000          # entries kept per stream (approximately); consumers are never that far behind
FIELD = b"m"                     # each entry holds one msgpack message under this field
DEAD_LETTER_MAXLEN = 1000        # dead letters kept (approximately): enough to inspect, bounded under a flood
DEAD_LETTER_BYTES = 4096         # of a dead-lettered payload, only its first bytes are kept (and its length)
TRIM_EVERY_S = 1.0
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_TTL_MS = 3000          # a service is gone once its heartbeat is this old
REDIS_URL_ENV = "PAGESTREAM_REDIS_URL"   # how serve hands its services the Redis URL (it may hold a password;
                                         # an environment, unlike argv, is not shown to every user by ps)


class Names:
    """Every stream and key of one deployment."""

    def __init__(self, prefix: str = "ps"):
        self.prefix = prefix
        self.tokenize = f"{prefix}:tokenize"
        self.schedule = f"{prefix}:schedule"
        self.abort = f"{prefix}:abort"
        self.dead_letter = f"{prefix}:dead-letter"
        self.scheduler_stats = f"{prefix}:stats:scheduler"

    def plan(self, worker: str) -> str:
        return f"{self.prefix}:plan:{worker}"

    def events(self, worker: str) -> str:
        return f"{self.prefix}:events:{worker}"

    def tokens(self, partition: int) -> str:
        return f"{self.prefix}:tokens:{partition}"

    def reply(self, gateway: str) -> str:
        return f"{self.prefix}:reply:{gateway}"

    def request_meta(self, request_id: str) -> str:
        return f"{self.prefix}:request:{request_id}"

    def alive(self, service: str, instance: str = "") -> str:
        return f"{self.prefix}:alive:{service}" + (f":{instance}" if instance else "")

    def gateway_stats(self, gateway: str) -> str:
        return f"{self.prefix}:stats:gateway:{gateway}"

    def worker_info(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"

    def partition_lease(self, partition: int) -> str:
        return f"{self.prefix}:lease:tokens:{partition}"

    def detok_state(self, request_id: str, index: int) -> str:
        return f"{self.prefix}:detok:{request_id}:{index}"

    def detok_done(self, request_id: str) -> str:
        return f"{self.prefix}:detok:{request_id}:done"


@dataclass
class Entry:
    stream: str
    id: bytes
    payload: bytes | None            # None: trimmed away before it was handled


def partition_of(request_id: str, partitions: int) -> int:
    """The detokenizer partition of a request: all its tokens go to one, so one detokenizer sees them in order
    (crc32, not Python's salted hash: every process must agree)."""
    return zlib.crc32(request_id.encode()) % partitions


def instance_id(service: str) -> str:
    """A consumer name that is unique across restarts: host, pid and a random suffix."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Transport:
    def __init__(self, url: str, prefix: str = "ps", maxlen: int = STREAM_MAXLEN):
        self.url = url
        self.redis = redis.Redis.from_url(url, health_check_interval=30)
        self.names = Names(prefix)
        self.maxlen = maxlen
        self._groups: set[tuple[str, str]] = set()

    def pipeline(self):
        """A MULTI/EXEC transaction: effects and acknowledgements land together or not at all."""
        return self.redis.pipeline(transaction=True)

    def publish(self, stream: str, payload: bytes, pipe=None) -> None:
        (pipe or self.redis).xadd(stream, {FIELD: payload}, maxlen=self.maxlen, approximate=True)

    def reply_error(self, gateway: str, request_id: str, message: str, pipe=None) -> None:
        """Tell a request's gateway (so its client) why the request is refused."""
        reply = Reply([ReplyItem(request_id=request_id, error=ErrorInfo(message))])
        self.publish(self.names.reply(gateway), encode(reply), pipe)

    def worker_info(self, worker: str) -> WorkerInfo | None:
        """The worker's registration (WorkerInfo), checked: every other message is checked against it. None
        before it has registered, or if what it registered is invalid (logged)."""
        raw = self.redis.get(self.names.worker_info(worker))
        try:
            info = decode(WorkerInfo, raw) if raw else None
            if info is not None:
                info.validate()
        except SchemaError as e:
            log.error("worker %s registered an invalid WorkerInfo: %s", worker, e)
            return None
        return info

    def ensure_group(self, stream: str, group: str) -> None:
        """Create the group at the start of the stream (entries added before it existed are not lost)."""
        if (stream, group) in self._groups:
            return
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add((stream, group))

    def read(self, streams: list[str], group: str, consumer: str, count: int = 64,
             block_ms: int | None = 100) -> list[Entry]:
        """New entries for this consumer from any of the streams, waiting up to block_ms for the first."""
        for stream in streams:
            self.ensure_group(stream, group)
        reply = self.redis.xreadgroup(group, consumer, {s: ">" for s in streams}, count=count, block=block_ms)
        return [Entry(name.decode(), entry_id, fields.get(FIELD) if fields else None)
                for name, entries in reply or [] for entry_id, fields in entries]

    def ack(self, stream: str, group: str, ids: list[bytes], pipe=None) -> None:
        if ids:
            (pipe or self.redis).xack(stream, group, *ids)

    def reclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 64) -> list[Entry]:
        """Take over entries that another consumer of the group left pending for min_idle_ms (it died).
        Entries already delivered MAX_DELIVERIES times go to the dead-letter stream instead."""
        self.ensure_group(stream, group)
        claimed = self.redis.xautoclaim(stream, group, consumer, min_idle_ms, start_id="0-0", count=count)[1]
        if not claimed:
            return []
        ids = [entry_id for entry_id, _ in claimed]
        pending = self.redis.xpending_range(stream, group, min=ids[0], max=ids[-1], count=len(ids) + 64,
                                            consumername=consumer)
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        entries = []
        for entry_id, fields in claimed:
            payload = fields.get(FIELD) if fields else None
            if deliveries.get(entry_id, 1) > MAX_DELIVERIES:
                self.dead_letter(stream, group, entry_id, payload, "too many deliveries")
            else:
                entries.append(Entry(stream, entry_id, payload))
        return entries

    def dead_letter(self, stream: str, group: str, entry_id: bytes, payload: bytes | None, reason: str) -> None:
        """Acknowledge the entry and keep a record of it: where it came from, why, and its first bytes (a
        stream of whole 50 MB messages would be a way to fill Redis's memory)."""
        log.warning("dead-lettering %s %s from %s: %s", stream, entry_id, group, reason[:500])
        payload = payload or b""
        pipe = self.pipeline()
        pipe.xadd(self.names.dead_letter, {b"stream": stream, b"group": group, b"id": entry_id,
                                           b"reason": reason[:DEAD_LETTER_BYTES], b"length": len(payload),
                                           FIELD: payload[:DEAD_LETTER_BYTES]},
                  maxlen=min(self.maxlen, DEAD_LETTER_MAXLEN), approximate=True)
        pipe.xack(stream, group, entry_id)
        pipe.execute()

    def trim_acknowledged(self, *streams: str) -> int:
        """Drop the entries every group of each stream has acknowledged (all of them before the oldest one still
        pending or not yet delivered). Returns how many went. A stream without groups is left to MAXLEN. Three
        round trips for any number of streams: the publisher trims its partitions between two steps."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_groups(stream)
        infos = pipe.execute(raise_on_error=False)             # an error: no such stream yet
        groups = {s: g for s, g in zip(streams, infos) if isinstance(g, list) and g}
        pipe = self.redis.pipeline(transaction=False)
        waiting = [(s, g["name"]) for s, gs in groups.items() for g in gs if g["pending"]]
        for stream, name in waiting:
            pipe.xpending(stream, name)
        oldest_pending = dict(zip(waiting, (p["min"] for p in pipe.execute()))) if waiting else {}
        pipe = self.redis.pipeline(transaction=False)
        for stream, gs in groups.items():
            keep_from = None
            for group in gs:
                # The first entry the group may still need: its oldest pending one, else any after the last
                # delivered.
                pending = oldest_pending.get((stream, group["name"]))
                if pending:
                    first = _stream_id(pending)
                else:
                    ms, seq = _stream_id(group["last-delivered-id"])
                    first = (ms, seq + 1)
                keep_from = first if keep_from is None else min(keep_from, first)
            pipe.xtrim(stream, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=False)
        return sum(pipe.execute()) if groups else 0

    def heartbeat(self, key: str, value: str | bytes = b"1", pipe=None) -> None:
        (pipe or self.redis).set(key, value, px=HEARTBEAT_TTL_MS)


class Reclaimer:
    """Paces XAUTOCLAIM: a consumer checks for abandoned entries every `every_s`, not on every read."""

    def __init__(self, transport: Transport, stream: str, group: str, consumer: str, min_idle_ms: int = 3000,
                 every_s: float = 1.0):
        self.transport, self.stream, self.group, self.consumer = transport, stream, group, consumer
        self.min_idle_ms, self.every_s = min_idle_ms, every_s
        self._next = 0.0

    def __call__(self) -> list[Entry]:
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.every_s
        return self.transport.reclaim(self.stream, self.group, self.consumer, self.min_idle_ms)


class Trimmer:
    """Paces trim_acknowledged: a consumer trims its streams every `every_s`, not on every acknowledgement."""

    def __init__(self, transport: Transport, streams: list[str], every_s: float = TRIM_EVERY_S):
        self.transport, self.streams, self.every_s = transport, list(streams), every_s
        self._next = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        try:
            self.transport.trim_acknowledged(*self.streams)
        except redis.RedisError:                           # trimming can wait for the next round
            log.exception("trimming %s failed", self.streams)


def _stream_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)
