"""The detokenizer service: M replicas turn the worker's token columns into text deltas for the gateways.

Each token goes through the engine's OutputProcessor (incremental detokenization, stop strings, finish reasons),
as LLMEngine's do; this service adds the partitions, the checkpoints and the exactly-once delivery.

Ordering: a request's tokens all go to one partition stream (tokens:<p>), and each partition has exactly one
owner at a time, held by a lease (a Redis key with a TTL, renewed every second). Replicas share the partitions
fairly (ceil(P / live replicas) each); a new replica takes what is free, and a dead one's leases expire and are
taken over, together with the entries it left pending.

Exactly once: for the entries of a partition that one read brings, the replies, the abort of a sequence that hit a
stop string, a checkpoint of each completion's state (each token handled, with how much text was released then)
and the entries' acknowledgement go in one MULTI/EXEC, guarded by WATCH on the partition's lease. So an entry's
effects happen entirely or not at all, a replica that lost its lease cannot write, and whoever takes over rebuilds
each completion from its checkpoint by replaying its tokens: no text lost, none sent twice.

On a Redis Cluster the partition's stream, lease and requests' keys share a hash slot (transport.Names), so that
transaction stays whole; only the replies and aborts live in other slots: they are written just before it, on
their own. If the transaction then fails (the lease was lost) or never runs, they are written again by whoever
handles the entries, with the same reply seqs, and the gateways drop the repeats (the scheduler, repeated aborts).

Redis going away: whether a batch's transaction ran is then unknown, so the partition's completions are
rebuilt from their checkpoints, and once Redis is back its pending entries are read again (tokens already
handled are dropped by position, as are the repeats a publisher that retried sends). A lease this replica
still holds is taken again at once, even after it forgot it.
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
from schemas.limits import Limits
from schemas.messages import Abort, Reply, ReplyItem, RequestMeta, StepTokens
from services.runtime import Heartbeat, keep_running, setup_logging, stop_event
from services.transport import HEARTBEAT_TTL_MS, REDIS_DOWN, Entry, Transport, instance_id, partition_of

log = logging.getLogger("pagestream.detokenizer")

GROUP = "detokenizer"
REBALANCE_EVERY_S = 1.0
FINISHED_TTL_S = 600               # a finished completion's marker: late tokens for it are dropped

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Free, or still this replica's (which may have forgotten it when Redis went away): take it.
_ACQUIRE = ("if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")


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
        if transport.cluster and partitions != transport.names.partitions:
            raise ValueError(f"{partitions} partitions, but the transport names keys for "
                             f"{transport.names.partitions}: a request's keys would leave its partition's slot")
        self.transport, self.names, self.redis = transport, transport.names, transport.redis
        self.output_processor, self.partitions = output_processor, partitions
        self.limits: Limits | None = None                # the worker's, its tokens are checked against (once known)
        self.consumer = instance_id("detokenizer")
        self.owned: set[int] = set()
        self.requests: dict[str, _Request] = {}          # requests of owned partitions that have state here
        self._rebalance_at = 0.0
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._acquire = self.redis.register_script(_ACQUIRE)

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, stop) -> None:
        Heartbeat(self.transport, self.names.alive("detokenizer", self.consumer), self.consumer, stop).start()
        log.info("detokenizer %s: %d partitions shared among replicas", self.consumer, self.partitions)

        def iteration() -> None:
            self._rebalance()
            if not self.owned:
                stop.wait(0.1)
                return
            streams = {self.names.tokens(p): p for p in sorted(self.owned)}
            batches: dict[int, list[Entry]] = {}
            for entry in self.transport.read(list(streams), GROUP, self.consumer, count=64, block_ms=50):
                batches.setdefault(streams[entry.stream], []).append(entry)
            for partition, entries in batches.items():
                self._handle_safely(partition, entries)

        keep_running(stop, iteration, "detokenizer", self.transport)
        for partition in list(self.owned):
            try:
                self._give_up(partition)
            except REDIS_DOWN:                           # its lease expires instead
                pass

    def _handle_safely(self, partition: int, entries: list[Entry]) -> None:
        if partition not in self.owned:
            return                                       # lost it meanwhile; the new owner handles the entries
        try:
            self._handle(partition, entries)
        except LeaseLost:
            log.warning("lost the lease of partition %d", partition)
            self._forget(partition)
        except REDIS_DOWN:
            # Whether the transaction ran is unknown: rebuild the completions from the checkpoints, and wait for
            # Redis (the loop does; the entries, still pending unless it ran, are read again then).
            self._forget_requests(partition)
            raise
        except redis.RedisError:
            # Nothing was applied (the transaction did not run): hand the partition back; its pending entries
            # are retried, from the checkpoints, by the next owner.
            log.exception("handling %d entries of %s failed", len(entries), entries[0].stream)
            self._give_up(partition)
        except Exception as e:
            # Something in the entries themselves. Nothing was applied, but their completions advanced in
            # memory: rebuild those from the checkpoints, then take the entries one at a time, so the bad one
            # is dead-lettered and holds up none of the others.
            self._forget_requests(partition)
            if len(entries) > 1:
                for entry in entries:
                    self._handle_safely(partition, [entry])
                return
            log.exception("entry %s of %s failed", entries[0].id, entries[0].stream)
            self.transport.dead_letter(entries[0].stream, GROUP, entries[0].id, entries[0].payload,
                                       f"{type(e).__name__}: {e}")

    # ---- a batch of entries --------------------------------------------------------------------------------
    def _handle(self, partition: int, entries: list[Entry]) -> None:
        """The entries one read brought from one partition, in one transaction: under load a read brings many,
        and their round trips to Redis and replies to each gateway are shared."""
        stream = self.names.tokens(partition)
        took = time.time()
        messages, ids = [], []
        for entry in entries:
            if entry.payload is None:                    # trimmed before anyone read it: only acknowledged
                ids.append(entry.id)
                continue
            try:
                messages.append(decode(StepTokens, entry.payload, self.limits))
                ids.append(entry.id)
            except SchemaError as e:
                self.transport.dead_letter(stream, GROUP, entry.id, entry.payload, str(e))
        lease = self.names.partition_lease(partition)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(lease)                            # any change of owner makes EXEC fail
            if pipe.get(lease) != self.consumer.encode():
                raise LeaseLost()
            completions = [[self._completion(rid, index, pipe) for rid, index in zip(msg.request_ids, msg.indexes)]
                           for msg in messages]
            pipe.multi()
            elsewhere = self.transport.pipeline() if self.transport.cluster else pipe     # other slots' writes
            replies: dict[str, list[ReplyItem]] = {}
            checkpoints: dict[tuple[str, int], list[bytes]] = {}
            for msg, step_completions in zip(messages, completions):
                for i, completion in enumerate(step_completions):
                    if completion is None or completion.finished or msg.positions[i] < completion.next_position:
                        continue                         # unknown (expired), already ended, or a repeat
                    item = self._advance(completion, msg, i, pipe, checkpoints, elsewhere)
                    if msg.on_host:
                        item.stamps = (msg.first_stamps[i] if msg.first_stamps else []) + [msg.on_host, took]
                    replies.setdefault(completion.meta.gateway, []).append(item)
            for gateway, items in replies.items():
                self.transport.publish(self.names.reply(gateway), encode(Reply(items)), elsewhere)
            self._save(checkpoints, pipe)
            if ids:
                self.transport.ack(stream, GROUP, ids, pipe)
            try:
                if elsewhere is not pipe:
                    elsewhere.execute()
                pipe.execute()
            except redis.WatchError:
                raise LeaseLost() from None

    def _advance(self, c: _Completion, msg: StepTokens, i: int, pipe, checkpoints: dict, elsewhere=None) -> ReplyItem:
        """Detokenize one token of completion c, add it to its checkpoint (in checkpoints, for _save) or end that
        (in pipe), and return its reply item (an abort, for a stop string, goes in elsewhere: on a Redis Cluster,
        pipe holds only the partition's slot)."""
        rid, index, token = msg.request_ids[i], msg.indexes[i], msg.token_ids[i]
        out = c.state.add_token(token, msg.finish_reasons[i], msg.stop_reasons[i])
        if out.stop_upstream:                            # a stop string: the worker doesn't know, stop it there
            self.transport.publish(self.names.abort, encode(Abort(rid, index, "stop", out.stop_reason)),
                                   pipe if elsewhere is None else elsewhere)
        item = ReplyItem(request_id=rid, index=index, seq=c.next_seq, text=out.text, token_ids=[token],
                         logprobs=[msg.logprobs[i]] if msg.logprobs is not None else None,
                         prompt_logprobs=msg.prompt_logprobs[i] if msg.prompt_logprobs else None,
                         finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                         prompt_tokens=c.meta.num_prompt_tokens, cached_tokens=msg.num_cached_tokens[i])
        c.next_seq += 1
        c.next_position = msg.positions[i] + 1
        if out.finish_reason is None:
            # The checkpoint: one "token released" pair per token handled.
            checkpoints.setdefault((rid, index), []).append(b"%d %d" % (token, c.state.released))
        else:
            checkpoints.pop((rid, index), None)         # its checkpoint is deleted: nothing more to save
            self._finish(c, rid, index, pipe)
        return item

    def _save(self, checkpoints: dict[tuple[str, int], list[bytes]], pipe) -> None:
        """The batch's checkpoint pairs, one command per completion: a read that brought many steps (a replica
        that fell behind) costs a command per completion, not per token."""
        for (rid, index), pairs in checkpoints.items():
            pipe.rpush(self._handled(rid, index), *pairs)

    def _handled(self, rid: str, index: int) -> str:
        return self.names.detok_handled(rid, index)

    def _finish(self, c: _Completion, rid: str, index: int, pipe) -> None:
        c.finished = True
        pipe.delete(self._handled(rid, index))
        pipe.set(self.names.detok_state(rid, index), 1, ex=FINISHED_TTL_S)     # late tokens are dropped
        request = self.requests[rid]
        request.done.add(index)
        if len(request.done) >= c.meta.params.num_sequences:     # the whole request is over: drop what it kept
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
        if pipe.exists(self.names.detok_state(rid, index)):
            c.finished = True                            # another replica finished it
        else:                                            # resume from what another replica handled, if any
            handled = [tuple(map(int, pair.split())) for pair in pipe.lrange(self._handled(rid, index), 0, -1)]
            if handled:
                # Positions and reply seqs both count the completion's tokens from 0, one each.
                c.next_seq = c.next_position = len(handled)
                c.state.restore([token for token, _ in handled], handled[-1][1])
        request.completions[index] = c
        return c

    # ---- partitions ----------------------------------------------------------------------------------------
    def _rebalance(self) -> None:
        now = time.monotonic()
        if now < self._rebalance_at:
            return
        self._rebalance_at = now + REBALANCE_EVERY_S
        info = self.transport.any_worker_info()          # read again every rebalance: a restarted worker
        self.limits = Limits.of(info) if info is not None else None     # registers anew
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
            if partition not in self.owned and self._acquire(keys=[self.names.partition_lease(partition)],
                                                             args=[self.consumer, HEARTBEAT_TTL_MS]):
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
            self._handle_safely(partition, entries)
        log.info("took partition %d", partition)

    def _give_up(self, partition: int) -> None:
        self._release(keys=[self.names.partition_lease(partition)], args=[self.consumer])
        self._forget(partition)
        log.info("released partition %d", partition)

    def _forget(self, partition: int) -> None:
        """Drop the partition and the in-memory state of its requests (the checkpoints stay for the next owner)."""
        self.owned.discard(partition)
        self._forget_requests(partition)

    def _forget_requests(self, partition: int) -> None:
        for rid in [r for r in self.requests if partition_of(r, self.partitions) == partition]:
            del self.requests[rid]



def run(args: argparse.Namespace) -> int:
    setup_logging("detokenizer")
    files = resolve_model(args.model, args.load_format, progress=False)
    transport = Transport(args.redis_url, args.prefix, partitions=args.partitions)
    processor = OutputProcessor(load_tokenizer(files, args.tokenizer))
    DetokenizerService(transport, processor, args.partitions).run(stop_event())
    return 0
