"""The detokenizer service: M replicas turn the worker's token columns into text deltas for the gateways.

Each token goes through the engine's OutputProcessor (incremental detokenization, stop strings, finish reasons),
as LLMEngine's do; this service adds the partitions, the checkpoints and the exactly-once delivery.

Ordering: a request's tokens all go to one partition stream (tokens:<p>), and each partition has exactly one
owner at a time, held by a lease (a Redis key with a TTL, renewed every second). Replicas share the partitions
fairly (ceil(P / live replicas) each); a new replica takes what is free, and a dead one's leases expire and are
taken over, together with the entries it left pending.

Exactly once: for every entry, the replies, the abort of a sequence that hit a stop string, a checkpoint of each
completion's state (its tokens, how much text was released, the next reply seq) and the entry's acknowledgement go
in one MULTI/EXEC, guarded by WATCH on the partition's lease. So an entry's effects happen entirely or not at
all, a replica that lost its lease cannot write, and whoever takes over rebuilds each completion from its
checkpoint by replaying its tokens: no text lost, none sent twice.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field

import redis

from engine.model_files import resolve_model
from engine.output_processor import CompletionState, OutputProcessor
from engine.tokenizer import load_tokenizer
from schemas.codec import SchemaError, decode, encode
from schemas.messages import Abort, Reply, ReplyItem, RequestMeta, StepTokens
from services.runtime import Heartbeat, setup_logging, stop_event
from services.transport import HEARTBEAT_TTL_MS, Transport, instance_id, partition_of

log = logging.getLogger("pagestream.detokenizer")

GROUP = "detokenizer"
REBALANCE_EVERY_S = 1.0
FINISHED_TTL_S = 600               # a finished completion's marker: late tokens for it are dropped

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass
class _Completion:
    meta: RequestMeta
    state: CompletionState
    next_position: int = 0         # the next token position expected from the worker
    next_seq: int = 0              # the next reply seq for the gateway
    finished: bool = False


@dataclass
class _Request:
    completions: dict[int, _Completion] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


class LeaseLost(Exception):
    pass


class DetokenizerService:
    def __init__(self, transport: Transport, output_processor: OutputProcessor, partitions: int):
        self.transport, self.names, self.redis = transport, transport.names, transport.redis
        self.output_processor, self.partitions = output_processor, partitions
        self.consumer = instance_id("detokenizer")
        self.owned: set[int] = set()
        self.requests: dict[str, _Request] = {}          # requests of owned partitions that have state here
        self._rebalance_at = 0.0
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, stop) -> None:
        Heartbeat(self.transport, self.names.alive("detokenizer", self.consumer), self.consumer, stop).start()
        log.info("detokenizer %s: %d partitions shared among replicas", self.consumer, self.partitions)
        while not stop.is_set():
            self._rebalance()
            if not self.owned:
                stop.wait(0.1)
                continue
            streams = [self.names.tokens(p) for p in sorted(self.owned)]
            for entry in self.transport.read(streams, GROUP, self.consumer, count=64, block_ms=50):
                self._handle_safely(int(entry.stream.rsplit(":", 1)[1]), entry)
        for partition in list(self.owned):
            self._give_up(partition)

    def _handle_safely(self, partition: int, entry) -> None:
        if partition not in self.owned:
            return                                       # lost it meanwhile; the new owner handles the entry
        try:
            self._handle(partition, entry)
        except LeaseLost:
            log.warning("lost the lease of partition %d", partition)
            self._forget(partition)
        except SchemaError as e:
            self.transport.dead_letter(entry.stream, GROUP, entry.id, entry.payload, str(e))
        except Exception:
            # Nothing of the entry was applied (the transaction did not run): hand the partition back so its
            # pending entries are retried from the checkpoints (a poison entry ends in the dead-letter stream).
            log.exception("handling %s %s failed", entry.stream, entry.id)
            self._give_up(partition)

    # ---- one entry -----------------------------------------------------------------------------------------
    def _handle(self, partition: int, entry) -> None:
        stream = self.names.tokens(partition)
        if entry.payload is None:                        # trimmed before anyone read it
            self.transport.ack(stream, GROUP, [entry.id])
            return
        took = time.time()
        msg = decode(StepTokens, entry.payload)
        lease = self.names.partition_lease(partition)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(lease)                            # any change of owner makes EXEC fail
            if pipe.get(lease) != self.consumer.encode():
                raise LeaseLost()
            completions = [self._completion(rid, index, pipe) for rid, index in zip(msg.request_ids, msg.indexes)]
            pipe.multi()
            replies: dict[str, list[ReplyItem]] = {}
            for i, completion in enumerate(completions):
                if completion is None or completion.finished or msg.positions[i] < completion.next_position:
                    continue                             # unknown (expired), already ended, or a repeat
                item = self._advance(completion, msg, i, pipe)
                if msg.on_host:
                    item.stamps = (msg.first_stamps[i] if msg.first_stamps else []) + [msg.on_host, took]
                replies.setdefault(completion.meta.gateway, []).append(item)
            for gateway, items in replies.items():
                self.transport.publish(self.names.reply(gateway), encode(Reply(items)), pipe)
            self.transport.ack(stream, GROUP, [entry.id], pipe)
            try:
                pipe.execute()
            except redis.WatchError:
                raise LeaseLost() from None

    def _advance(self, c: _Completion, msg: StepTokens, i: int, pipe) -> ReplyItem:
        """Detokenize one token of completion c, checkpoint it, and return its reply item."""
        rid, index, token = msg.request_ids[i], msg.indexes[i], msg.token_ids[i]
        out = c.state.add_token(token, msg.finish_reasons[i], msg.stop_reasons[i])
        if out.stop_upstream:                            # a stop string: the worker doesn't know, stop it there
            self.transport.publish(self.names.abort, encode(Abort(rid, index, "stop", out.stop_reason)), pipe)
        item = ReplyItem(request_id=rid, index=index, seq=c.next_seq, text=out.text, token_ids=[token],
                         logprobs=[msg.logprobs[i]] if msg.logprobs is not None else None,
                         finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                         prompt_tokens=c.meta.num_prompt_tokens, cached_tokens=msg.num_cached_tokens[i])
        c.next_seq += 1
        c.next_position = msg.positions[i] + 1
        state = self.names.detok_state(rid, index)
        if out.finish_reason is None:
            pipe.rpush(f"{state}:tokens", token)
            pipe.hset(state, mapping={"next_seq": c.next_seq, "next_position": c.next_position,
                                      "released": c.state.released})
        else:
            self._finish(c, rid, index, pipe)
        return item

    def _finish(self, c: _Completion, rid: str, index: int, pipe) -> None:
        c.finished = True
        state = self.names.detok_state(rid, index)
        pipe.delete(f"{state}:tokens")
        pipe.hset(state, mapping={"finished": 1, "next_seq": c.next_seq, "next_position": c.next_position})
        pipe.expire(state, FINISHED_TTL_S)
        request = self.requests[rid]
        request.done.add(index)
        if len(request.done) >= c.meta.params.n:         # the whole request is over: drop what it kept
            pipe.delete(self.names.request_meta(rid), self.names.detok_done(rid))
            del self.requests[rid]
        else:
            pipe.sadd(self.names.detok_done(rid), index)
            pipe.expire(self.names.detok_done(rid), FINISHED_TTL_S * 10)

    def _completion(self, rid: str, index: int, pipe) -> _Completion | None:
        """The completion's state: in memory, or rebuilt from the request's metadata and its checkpoint."""
        request = self.requests.get(rid)
        if request is not None and index in request.completions:
            return request.completions[index]
        raw = pipe.get(self.names.request_meta(rid))
        if raw is None:
            return None                                  # the request is over (or expired): drop its tokens
        meta = decode(RequestMeta, raw)
        if request is None:
            request = self.requests[rid] = _Request(done={int(i) for i in pipe.smembers(self.names.detok_done(rid))})
        c = _Completion(meta, self.output_processor.new_completion(meta.prompt_tail, meta.params))
        state = {k.decode(): int(v) for k, v in pipe.hgetall(self.names.detok_state(rid, index)).items()}
        if state:                                        # another replica handled it before: resume
            c.next_seq, c.next_position = state["next_seq"], state["next_position"]
            c.finished = bool(state.get("finished"))
            if not c.finished:
                tokens = pipe.lrange(f"{self.names.detok_state(rid, index)}:tokens", 0, -1)
                c.state.restore([int(t) for t in tokens], state["released"])
        request.completions[index] = c
        return c

    # ---- partitions ----------------------------------------------------------------------------------------
    def _rebalance(self) -> None:
        now = time.monotonic()
        if now < self._rebalance_at:
            return
        self._rebalance_at = now + REBALANCE_EVERY_S
        for partition in list(self.owned):
            if not self._renew(keys=[self.names.partition_lease(partition)], args=[self.consumer, HEARTBEAT_TTL_MS]):
                log.warning("lease of partition %d expired", partition)
                self._forget(partition)
        live = max(1, sum(1 for _ in self.redis.scan_iter(match=self.names.alive("detokenizer", "*"), count=100)))
        share = math.ceil(self.partitions / live)
        while len(self.owned) > share:                   # someone joined: hand over what is beyond the share
            self._give_up(max(self.owned))
        # Start looking at a replica-specific offset so replicas don't all contend for partition 0 first.
        offset = hash(self.consumer) % self.partitions
        for k in range(self.partitions):
            if len(self.owned) >= share:
                break
            partition = (offset + k) % self.partitions
            if partition not in self.owned and self.redis.set(self.names.partition_lease(partition), self.consumer,
                                                              nx=True, px=HEARTBEAT_TTL_MS):
                self._take_over(partition)

    def _take_over(self, partition: int) -> None:
        """Own the partition: first handle what its previous owner left pending, in order."""
        self.owned.add(partition)
        stream = self.names.tokens(partition)
        self.transport.ensure_group(stream, GROUP)
        while partition in self.owned:
            entries = self.transport.reclaim(stream, GROUP, self.consumer, min_idle_ms=0, count=256)
            if not entries:
                break
            for entry in entries:
                self._handle_safely(partition, entry)
        log.info("took partition %d", partition)

    def _give_up(self, partition: int) -> None:
        self._release(keys=[self.names.partition_lease(partition)], args=[self.consumer])
        self._forget(partition)
        log.info("released partition %d", partition)

    def _forget(self, partition: int) -> None:
        """Drop the partition and the in-memory state of its requests (the checkpoints stay for the next owner)."""
        self.owned.discard(partition)
        for rid in [r for r in self.requests if partition_of(r, self.partitions) == partition]:
            del self.requests[rid]



def run(args: argparse.Namespace) -> int:
    setup_logging("detokenizer")
    files = resolve_model(args.model, args.load_format, progress=False)
    transport = Transport(args.redis_url, args.prefix)
    processor = OutputProcessor(load_tokenizer(files, args.tokenizer))
    DetokenizerService(transport, processor, args.partitions).run(stop_event())
    return 0
