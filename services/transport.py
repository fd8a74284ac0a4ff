"""Redis streams as the pipeline's wires.

One stream per hop, one consumer group per service type. A consumer acknowledges (XACK) an entry in the same
MULTI/EXEC transaction that writes its effect downstream, so an entry is either fully handled or not at all; a
consumer that dies leaves its entries pending, and a live one of the same group reclaims them (XAUTOCLAIM) after
they sat idle for a while. An entry delivered more than MAX_DELIVERIES times (a poison message) goes to the
dead-letter stream instead of being retried forever. Every XADD trims its stream (MAXLEN ~), and each consuming
service trims what its group has acknowledged (Trimmer), so a stream holds only what is still to be handled.
The dead-letter stream keeps a message's first bytes and its length, not the message: Redis's memory stays
bounded whatever is sent.

Redis may go away (killed, restarting, loading its append-only file) and come back: every loop that uses it
waits it out (RedisOutage: logged once, exponential backoff with jitter) and goes on, and a consumer that lost
its connection reads its own pending entries again before new ones (Transport.lost_connection), since a read
whose reply was lost left them delivered to it but never seen. A transaction whose reply was lost may have run or
not: sent again, it only repeats entries, which their readers drop.

All names live under a prefix, so several deployments (or tests) can share one Redis.

The Redis may be a Redis Cluster (a redis+cluster:// URL, see connect): the names' hash tags keep what one
command or transaction uses in one slot and spread the rest (Names); a transaction that would span slots
acknowledges last instead (ClusterTransaction); a read of streams in several slots asks each (_xreadgroup).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
import socket
import time
import uuid
import zlib
from dataclasses import dataclass

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode, RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

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
DEFAULT_PARTITIONS = 8           # detokenizer partitions (--partitions)
REDIS_URL_ENV = "PAGESTREAM_REDIS_URL"   # how serve hands its services the Redis URL (it may hold a password;
                                         # an environment, unlike argv, is not shown to every user by ps)
# Redis unreachable: a connection refused or lost, a timeout, or (a ConnectionError too) BusyLoadingError while a
# restarted Redis loads its append-only file; on a Redis Cluster also CLUSTERDOWN, while a node that went away
# rejoins. A refused password is also a ConnectionError, but no outage.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError)
BACKOFF_BASE_S = 0.05            # the first wait for a Redis that went away; doubled at each failure
BACKOFF_CAP_S = 1.0              # the longest wait: a Redis back is seen within about a second
# A Redis up for less than this has just restarted: heartbeats that expired while it was down are on their way
# back (each service beats within a backoff and a heartbeat of reaching it), so a missing one is no death yet.
RESTART_GRACE_S = 5
CLUSTER_WAIT_MS = 2              # on a Redis Cluster, a read of streams in several slots waits on one slot at a
                                 # time, this long, between looks at all of them (Transport._xreadgroup)


class Names:
    """Every stream and key of one deployment.

    Each name begins with a hash tag, {prefix:...}: on a Redis Cluster, the keys that one command or transaction
    uses together share a hash slot, and the rest spread over the nodes.
      {ps:scheduler}:...   the scheduler's inputs (schedule, abort, resume, events:<worker>): one XREADGROUP reads them
      {ps:tokens:<p>}      a detokenizer partition's stream, and beside it (...:lease, ...:request:<id>, ...:detok:...)
                           its lease and the keys of every request whose tokens it carries: the detokenizer's fenced
                           transaction (WATCH the lease, checkpoint, acknowledge) stays in one slot
      {ps:alive}:...       heartbeats, and {ps:stats}:... the services' statistics: each read together (MGET)
      {ps:tokenize}, {ps:plan:<worker>}, {ps:reply:<gateway>}, {ps:dead-letter}, {ps:worker:<worker>} (a worker's
      registration), {ps:workers} (the set of workers' names): one each
    A request's keys follow its partition (partition_of), so every service that names them must know the
    deployment's number of partitions."""

    def __init__(self, prefix: str = "ps", partitions: int = DEFAULT_PARTITIONS):
        self.prefix, self.partitions = prefix, partitions
        self.tokenize = f"{{{prefix}:tokenize}}"
        self.schedule = f"{{{prefix}:scheduler}}:schedule"
        self.abort = f"{{{prefix}:scheduler}}:abort"
        self.resume = f"{{{prefix}:scheduler}}:resume"
        self.dead_letter = f"{{{prefix}:dead-letter}}"
        self.scheduler_stats = f"{{{prefix}:stats}}:scheduler"
        self.workers = f"{{{prefix}:workers}}"            # the registry: every worker adds its name at start

    def plan(self, worker: str) -> str:
        return f"{{{self.prefix}:plan:{worker}}}"

    def events(self, worker: str) -> str:
        return f"{{{self.prefix}:scheduler}}:events:{worker}"

    def tokens(self, partition: int | str) -> str:
        return f"{{{self.prefix}:tokens:{partition}}}"

    def reply(self, gateway: str) -> str:
        return f"{{{self.prefix}:reply:{gateway}}}"

    def gateway_of_reply(self, stream: str) -> str:
        """The gateway whose reply stream this is (reply's inverse)."""
        return stream[len(self.reply("")) - 1:-1]

    def request_meta(self, request_id: str) -> str:
        return f"{self._request(request_id)}:request:{request_id}"

    def alive(self, service: str, instance: str = "") -> str:
        return f"{{{self.prefix}:alive}}:{service}" + (f":{instance}" if instance else "")

    def gateway_stats(self, gateway: str) -> str:
        return f"{{{self.prefix}:stats}}:gateway:{gateway}"

    def worker_info(self, worker: str) -> str:
        return f"{{{self.prefix}:worker:{worker}}}"

    def partition_lease(self, partition: int) -> str:
        return f"{self.tokens(partition)}:lease"

    def detok_state(self, request_id: str, index: int) -> str:
        return f"{self._request(request_id)}:detok:{request_id}:{index}"

    def detok_handled(self, request_id: str, index: int) -> str:
        """A completion's checkpoint at the detokenizers: one "token released" pair per token its client got."""
        return f"{self.detok_state(request_id, index)}:tokens"

    def detok_done(self, request_id: str) -> str:
        return f"{self._request(request_id)}:detok:{request_id}:done"

    def _request(self, request_id: str) -> str:
        return self.tokens(partition_of(request_id, self.partitions))

    def label(self, key: str) -> str:
        """The key without its hash tag's prefix, for people (metrics): "tokens:3", "schedule", "events:w0"."""
        tag, _, rest = key.partition("}")
        return rest[1:] if rest else tag[len(self.prefix) + 2:]


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


class RedisOutage:
    """One loop's view of Redis being unreachable: logged once when it starts and once when it ends, and how
    long to wait before the next try (exponential, with jitter so that the services do not all retry at once)."""

    def __init__(self, what: str):
        self.what = what
        self.since: float | None = None              # when the first failure of this outage was seen
        self.failures = 0

    def failed(self, error: Exception) -> float:
        """Seconds to wait before trying again. A refused password is no outage: raised again."""
        if isinstance(error, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
            raise error
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: cannot reach Redis (%s: %s); retrying until it answers", self.what,
                        type(error).__name__, error)
        self.failures += 1
        return random.uniform(0.5, 1.0) * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (self.failures - 1))

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("%s: Redis answers again, after %.1f s", self.what, self.down_for)
            self.since, self.failures = None, 0

    @property
    def down_for(self) -> float:
        """Seconds since Redis was first found unreachable (0 while it answers)."""
        return 0.0 if self.since is None else time.monotonic() - self.since


# --redis-url of a Redis Cluster: redis+cluster://[[user]:password@]host:port[,host:port...] (rediss+cluster:// with
# TLS); the nodes listed are where the client starts (any one will do: it finds the others), the credentials, TLS
# and query options apply to all.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def _cluster_arguments(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as redis-py takes it: the first node's plain URL (credentials, TLS, options) and the others'
    (host, port)."""
    scheme, _, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")
    rest, _, query = rest.partition("?")
    rest, _, db = rest.partition("/")
    if db not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {db!r}")
    nodes = []
    for node in rest.split(","):
        host, _, port = node.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a Redis Cluster URL lists host:port pairs, separated by commas: not {node!r}")
        nodes.append((host, int(port)))
    first = f"{CLUSTER_SCHEMES[scheme]}://{userinfo}{at}{nodes[0][0]}:{nodes[0][1]}" + (f"?{query}" if query else "")
    return first, nodes[1:]


def connect(url: str, **options) -> redis.Redis | RedisCluster:
    """A client of the Redis at `url`: redis-py's Redis, or its RedisCluster for a cluster URL."""
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    first, others = _cluster_arguments(url)
    return RedisCluster(url=first, startup_nodes=[ClusterNode(host, port) for host, port in others], **options)


def connect_async(url: str, **options) -> redis.asyncio.Redis | AsyncRedisCluster:
    """connect's asyncio twin."""
    if not is_cluster_url(url):
        return redis.asyncio.Redis.from_url(url, **options)
    first, others = _cluster_arguments(url)
    return AsyncRedisCluster.from_url(first, startup_nodes=[AsyncClusterNode(host, port) for host, port in others],
                                      **options)


def on_node_of(client, key: str) -> dict:
    """The options that send a command without keys (INFO) to the node that holds `key`, on a Redis Cluster."""
    if isinstance(client, (RedisCluster, AsyncRedisCluster)):
        return {"target_nodes": client.get_node_from_key(key)}
    return {}


def just_restarted(server_info: dict) -> bool:
    """Whether Redis (its INFO server section) started less than RESTART_GRACE_S ago."""
    return server_info.get("uptime_in_seconds", RESTART_GRACE_S) < RESTART_GRACE_S


class Transport:
    def __init__(self, url: str, prefix: str = "ps", maxlen: int = STREAM_MAXLEN,
                 partitions: int = DEFAULT_PARTITIONS):
        self.url = url
        # No retries inside redis-py: every failure reaches the loop around the call, which waits Redis out and
        # knows that a read may have delivered entries it never saw (its default, 10 retries of each command and
        # of each connect, also held a caller for seconds).
        self.redis = connect(url, health_check_interval=30, retry=Retry(NoBackoff(), 0))
        self.cluster = isinstance(self.redis, RedisCluster)
        self.names = Names(prefix, partitions)
        self.maxlen = maxlen
        self._groups: set[tuple[str, str]] = set()
        self._readers: set[tuple[str, str, str]] = set()         # (stream, group, consumer) read so far
        self._pending_from: dict[tuple[str, str, str], bytes] = {}   # read its pending entries again, after this id

    def lost_connection(self) -> None:
        """Redis went away: each stream this transport reads is first read again from its consumer's pending
        entries (delivered by a read or a transaction whose reply was lost), and its group made sure of again
        (a Redis without persistence comes back empty)."""
        self._groups.clear()
        self._pending_from = {reader: b"0" for reader in self._readers}

    def restarted_recently(self) -> bool:
        """Whether the Redis that holds the heartbeats has just restarted."""
        return just_restarted(self.redis.info("server", **on_node_of(self.redis, self.names.alive("scheduler"))))

    def pipeline(self):
        """A MULTI/EXEC transaction: effects and acknowledgements land together or not at all. On a Redis Cluster
        a transaction cannot span hash slots: see ClusterTransaction."""
        return ClusterTransaction(self.redis) if self.cluster else self.redis.pipeline(transaction=True)

    def publish(self, stream: str, payload: bytes, pipe=None) -> None:
        (pipe or self.redis).xadd(stream, {FIELD: payload}, maxlen=self.maxlen, approximate=True)

    def reply_error(self, gateway: str, request_id: str, message: str, pipe=None, code: int = 400,
                    type: str = "invalid_request_error") -> None:
        """Tell a request's gateway (so its client) why the request is refused or ended."""
        reply = Reply([ReplyItem(request_id=request_id, error=ErrorInfo(message, type=type, code=code))])
        self.publish(self.names.reply(gateway), encode(reply), pipe)

    def register_worker(self, info: WorkerInfo) -> None:
        """A worker's registration (its KV pool and limits), and its name in the registry the scheduler reads."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.names.worker_info(info.worker), encode(info))
        pipe.sadd(self.names.workers, info.worker)
        pipe.execute()

    def live_workers(self) -> dict[str, str]:
        """The registered workers whose heartbeat is alive: name -> epoch (its heartbeat's value), by name."""
        names = sorted(m.decode() for m in self.redis.smembers(self.names.workers))
        beats = self.redis.mget([self.names.alive("worker", n) for n in names]) if names else []
        return {name: beat.decode() for name, beat in zip(names, beats) if beat is not None}

    def any_worker_info(self) -> WorkerInfo | None:
        """A live worker's registration: the model's limits, which every worker of a deployment shares."""
        for name in self.live_workers():
            info = self.worker_info(name)
            if info is not None:
                return info
        return None

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
        """New entries for this consumer from any of the streams, waiting up to block_ms for the first. After
        lost_connection, first the consumer's own pending entries (in order, without waiting), then new ones."""
        for stream in streams:
            self.ensure_group(stream, group)
            self._readers.add((stream, group, consumer))
        pending = {s: self._pending_from[(s, group, consumer)] for s in streams
                   if (s, group, consumer) in self._pending_from}
        if pending:
            entries = self._xreadgroup(group, consumer, pending, count, None)
            for stream in pending:
                last = [e.id for e in entries if e.stream == stream]
                if last:
                    self._pending_from[(stream, group, consumer)] = last[-1]
                else:                                    # all read again: new entries from now on
                    del self._pending_from[(stream, group, consumer)]
            if entries:
                return entries
        return self._xreadgroup(group, consumer, {s: ">" for s in streams}, count, block_ms)

    def _xreadgroup(self, group: str, consumer: str, streams: dict[str, str], count: int,
                    block_ms: int | None) -> list[Entry]:
        """XREADGROUP; on a Redis Cluster, one per hash slot of the streams (a command reads one slot only)."""
        by_slot: dict[int, dict[str, str]] = {}
        for stream, position in streams.items():
            by_slot.setdefault(self.redis.keyslot(stream) if self.cluster else 0, {})[stream] = position
        if len(by_slot) == 1:
            return self._entries(self.redis.xreadgroup(group, consumer, streams, count=count, block=block_ms))
        # Streams in several slots (a detokenizer's partitions): every slot asked at once (one round trip to each
        # node); while none has entries, wait on each slot in turn, CLUSTER_WAIT_MS at a time (no one command
        # can wait on several nodes), until block_ms is over.
        deadline = time.monotonic() + (block_ms or 0) / 1000
        slots = list(by_slot.values())
        for turn in itertools.count():
            pipe = self.redis.pipeline(transaction=False)
            for positions in slots:
                pipe.xreadgroup(group, consumer, positions, count=count)
            entries = [e for reply in pipe.execute() for e in self._entries(reply)]
            left_ms = math.ceil((deadline - time.monotonic()) * 1000)     # rounded down, it ended a ms early
            if entries or left_ms <= 0:
                return entries
            entries = self._entries(self.redis.xreadgroup(group, consumer, slots[turn % len(slots)], count=count,
                                                          block=min(left_ms, CLUSTER_WAIT_MS)))
            if entries:
                return entries
        raise AssertionError("unreachable")

    @staticmethod
    def _entries(reply) -> list[Entry]:
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
                    first = stream_id(pending)
                else:
                    ms, seq = stream_id(group["last-delivered-id"])
                    first = (ms, seq + 1)
                keep_from = first if keep_from is None else min(keep_from, first)
            pipe.xtrim(stream, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=False)
        return sum(pipe.execute()) if groups else 0

    def heartbeat(self, key: str, value: str | bytes = b"1", pipe=None) -> None:
        (pipe or self.redis).set(key, value, px=HEARTBEAT_TTL_MS)


class ClusterTransaction:
    """Transport.pipeline() on a Redis Cluster, where MULTI/EXEC cannot span hash slots. The commands are queued as
    given; execute() sends those of the slots that acknowledge nothing first, in one pipeline (one round trip to
    each node, all at once; each slot's commands in order), then the commands of each slot that acknowledges
    (XACK) as one MULTI/EXEC. So an entry is acknowledged only once its effects elsewhere are written; a consumer
    that dies in between leaves it pending, to be handled again, and its effects are written again, which their
    readers drop (every message has its (request_id, seq), every plan and event its id). execute() returns the
    results in the order the commands were queued."""

    def __init__(self, client: RedisCluster):
        self.client = client
        self.queued: list[tuple[int, str, tuple, dict]] = []      # (slot, command, arguments, options)

    def __getattr__(self, command: str):
        def queue(key, *args, **kwargs):              # every command queued here names its key first
            self.queued.append((self.client.keyslot(key), command, (key, *args), kwargs))
            return self
        return queue

    def execute(self) -> list:
        acknowledging = sorted({slot for slot, command, _, _ in self.queued if command == "xack"})
        effects = [i for i, (slot, *_) in enumerate(self.queued) if slot not in acknowledging]
        steps = [effects] + [[i for i, (s, *_) in enumerate(self.queued) if s == slot] for slot in acknowledging]
        results: list = [None] * len(self.queued)
        for step, indexes in enumerate(steps):
            if not indexes:
                continue
            pipe = self.client.pipeline(transaction=step > 0)
            for i in indexes:
                _, command, args, kwargs = self.queued[i]
                getattr(pipe, command)(*args, **kwargs)
            for i, result in zip(indexes, pipe.execute()):
                results[i] = result
        self.queued = []
        return results


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
        except REDIS_DOWN:                                 # the loop around waits Redis out; trimming can wait
            pass
        except redis.RedisError:                           # trimming can wait for the next round
            log.exception("trimming %s failed", self.streams)


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id (b"1700000000000-3") as a pair that orders like the ids."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)
