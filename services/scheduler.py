"""The scheduler service: the engine's Scheduler and block accounting for every worker, one plan ahead of each.

It reads its inputs in one call: new requests (schedule), aborts (abort), resumes, and each worker's per-plan
events (events:<worker>). For each worker it keeps two plans outstanding: while the worker runs plan r, plan r+1
already waits in its stream, made before r's tokens were known (their tokens count as in flight, see
engine.scheduler). So a worker never waits for the scheduler, and the scheduler never waits for a token it does not
need. A prompt that can be admitted does not wait for those two: it goes out at once in a third plan, and the worker
ends the running plan at its next step boundary and runs none of the queued one if it only decodes (each event says
how many steps ran; Scheduler.cut takes back the rest).

Data parallel: the workers are those in the registry (each adds its name when it starts) whose heartbeat is alive.
Each has its own KV pool, so each has its own engine Scheduler here, and a request is placed on one of them when it
arrives (services/placement.py: prefix-cache affinity, then load). One scheduler over several workers, rather than
one per worker behind a router, because placement then reads each pool's real prefix cache instead of a router's
guess, and a request can move between workers without a handover between services.

A worker that dies or restarts (its heartbeat gone, or its epoch changed) loses its KV pool, not its requests:
each one it held moves to a live worker (Scheduler.adopt) with its prompt and the tokens its client already got
(those known here, and the few more of a plan still running, from the detokenizers' checkpoints), and is prefilled
again there (recompute). The stream goes on from the next position: no gap, no repeat, and, as the sampler is a
function of (seed, position), greedy and seeded requests continue exactly as undisturbed. (A token the dead
worker's publisher sent but no detokenizer had taken yet, at most a few milliseconds' worth, is computed again; the
detokenizer keeps whichever comes first for its position.) With no worker alive, the requests wait here for one to
register.

Redis going away stops nothing held here: the loop waits it out (runtime.keep_running), reads its pending
entries again (a repeated request or abort is dropped, an event for a plan no longer outstanding too), and a plan
made meanwhile waits in its worker's `unsent` until Redis takes it, in order (sent twice, the worker drops the
repeat by its plan id).

Each request has an owner, the gateway streaming it: first the one that took it, then any that took it over
(Resume: its client came back there with Last-Event-ID, see services/resumable.py). When an owner's heartbeat is
gone for the grace period (--resume-grace), its requests nobody took over are aborted; a dead gateway's reply
stream is deleted once no request in flight writes to it any more.

What it reads is trusted no further than its schema and value ranges, against the workers' limits (WorkerInfo):
a request, abort or event that fails is dead-lettered (a request's gateway gets an error reply too), and the
requests in flight go on as if it never came.
"""
from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from engine.beam_search import BeamSearchResult
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.input_processor import InputProcessor
from engine.plan import Plan, StepResult, TokenLogprobs
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence
from schemas.codec import SchemaError, decode, encode
from schemas.beam_search_params import BeamSearchParams
from schemas.sampling_params import SamplingParams
from schemas.limits import Limits
from schemas.messages import (RESUMED_ELSEWHERE, Abort, PlanMessage, Resume, ScheduleRequest, StepEvent, StepTokens,
                              WorkerInfo)
from services.placement import Placement
from services.runtime import Heartbeat, keep_running, setup_logging, stop_event
from services.transport import Entry, Transport, Trimmer, instance_id, partition_of

log = logging.getLogger("pagestream.scheduler")

GROUP = "scheduler"
MAX_OUTSTANDING_PLANS = 2          # the one running and the next, waiting in the worker's stream
MAX_OUTSTANDING_WITH_PROMPTS = 3   # plus one that admits prompts at the running plans' next step boundary
STATS_EVERY_S = 0.5
WORKERS_EVERY_S = 1.0              # how often the registry is read for workers that joined
REAP_EVERY_S = 1.0                 # how often owners' heartbeats are looked at
REPLY_STREAMS_EVERY_S = 10.0       # how often the reply streams are listed, for deleting dead gateways' streams
REPLY_STREAM_LINGER_S = 10.0       # after the grace period and the last request writing to it, a stream's last items
                                   # may still be replayed to a client that resumed: it stays this much longer
QUEUE_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Bounded(OrderedDict):
    """A set of the most recent ids: requests seen or aborted, for dropping duplicates and late arrivals."""

    def __init__(self, size: int = 100_000):
        super().__init__()
        self.size = size

    def add(self, key: str) -> None:
        self[key] = None
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


@dataclass
class WorkerSlot:
    """One worker this scheduler drives: the engine Scheduler over its KV pool, and the plans in flight to it."""
    name: str
    epoch: str
    scheduler: Scheduler
    limits: Limits
    outstanding: OrderedDict[int, Plan] = field(default_factory=OrderedDict)     # plan id -> plan, in order
    unsent: deque[bytes] = field(default_factory=deque)    # plans made but not yet in the worker's stream


@dataclass
class Orphan:
    """A request whose worker is gone, waiting for a live one: its unfinished sequences (adopted as they are), or,
    for a beam search, the request itself (started again)."""
    request_id: str
    seqs: list[Sequence]
    beam_search: tuple[SamplingParams, BeamSearchParams] | None = None     # the request's own params, and its search's


class SchedulerService:
    def __init__(self, transport: Transport, config: SchedulerConfig, enable_prefix_caching: bool,
                 seed: int = 0, resume_grace_s: float = 30.0, partitions: int = 8, placement: str = "prefix"):
        self.transport, self.names = transport, transport.names
        self.partitions = partitions                       # the detokenizers': finished beam searches go there
        self.beam_searches = self.beam_kv_blocks_saved_peak = 0
        self.config, self.enable_prefix_caching = config, enable_prefix_caching
        self.epoch = uuid.uuid4().hex
        self.consumer = instance_id("scheduler")
        self.seed = seed
        self.workers: dict[str, WorkerSlot] = {}           # the live workers, by name
        self.placement = Placement(placement)
        self.where: dict[str, str] = {}                    # request id -> the worker it runs on
        self.orphans: list[Orphan] = []                    # requests of dead workers, with no live worker yet
        # The beam searches in flight, as asked (a beam's params are the search's own): started again if moved.
        self.beams: dict[str, tuple[SamplingParams, BeamSearchParams]] = {}
        self.next_plan_id = 0            # one count over every worker: an event of a lost worker matches no plan
        self.migrated = 0
        self.placed: Counter = Counter()                   # (worker, reason) -> requests placed, ever
        # The counters of workers lost (preemptions, prefix-cache lookups...): the deployment's totals never go down.
        self.retired: Counter = Counter()
        self.input_processor: InputProcessor | None = None     # the deployment's limits; chooses unseeded seeds
        self.limits: Limits | None = None                  # the model's vocabulary and max_model_len (every worker's)
        self._workers_at = 0.0
        self.gateways: dict[str, str] = {}                 # request id -> the gateway whose reply stream has it
        self.owners: dict[str, str] = {}                   # request id -> the gateway that took it over, if one did
        self.resume_grace_s = resume_grace_s
        self.gone_since: dict[str, float] = {}             # gateway -> when its heartbeat was first seen missing
        self._reap_at = self._list_streams_at = 0.0
        self.reply_streams: set[str] = set()               # the gateways with a reply stream, as last listed
        self.last_written: dict[str, float] = {}           # gateway -> when a request in flight last wrote to it
        self.stamps: dict[str, list[float]] = {}           # request id -> its stamps, until admitted
        self.seen, self.aborted = _Bounded(), _Bounded()
        self.queue_time_counts = [0] * (len(QUEUE_TIME_BUCKETS) + 1)
        self.queue_time_sum = 0.0
        self._stats_at = 0.0
        self._stats_fields: set[str] = set()

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, stop) -> None:
        Heartbeat(self.transport, self.names.alive("scheduler"), self.epoch, stop).start()
        inputs = [self.names.abort, self.names.resume, self.names.schedule]
        log.info("scheduler %s (epoch %s), placement %s", self.consumer, self.epoch[:8], self.placement.policy)
        trimmer: tuple[list[str], Trimmer] | None = None           # for the streams of the workers driven now
        idle = True

        def iteration() -> None:
            nonlocal idle, trimmer
            self._track_workers()
            if not self.workers:                  # inputs wait in their streams until a worker registers
                stop.wait(0.2)
                return
            streams = [self.names.events(w) for w in self.workers] + inputs
            if trimmer is None or trimmer[0] != streams:
                trimmer = (streams, Trimmer(self.transport, streams))
            trimmer[1]()
            self._send_plans()
            # Don't wait for input when a plan can go out now; otherwise block until something arrives.
            entries = self.transport.read(streams, GROUP, self.consumer, count=512, block_ms=50 if idle else None)
            self._handle(entries)
            planned = False
            for slot in list(self.workers.values()):
                room = len(slot.outstanding) < MAX_OUTSTANDING_PLANS or (
                    len(slot.outstanding) < MAX_OUTSTANDING_WITH_PROMPTS and slot.scheduler.has_prompt_work())
                planned = (room and self._plan(slot)) or planned
            idle = not planned and not entries
            self._publish_stats()
            self._reap()

        keep_running(stop, iteration, "scheduler", self.transport)

    def _handle(self, entries: list[Entry]) -> None:
        pipe = self.transport.pipeline()
        took = time.time()
        events = {self.names.events(w): slot for w, slot in self.workers.items()}
        for entry in entries:
            try:
                if entry.stream in events:
                    slot = events[entry.stream]
                    self._on_event(slot, decode(StepEvent, entry.payload, slot.limits))
                elif entry.stream == self.names.abort:
                    self._on_abort(decode(Abort, entry.payload, self.limits))
                elif entry.stream == self.names.resume:
                    self._on_resume(decode(Resume, entry.payload, self.limits), pipe)
                else:
                    self._on_request(decode(ScheduleRequest, entry.payload), took, pipe)
            except SchemaError as e:                           # nothing of it was applied
                self.transport.dead_letter(entry.stream, GROUP, entry.id, entry.payload, str(e))
                continue
            self.transport.ack(entry.stream, GROUP, [entry.id], pipe)
        pipe.execute()

    # ---- inputs --------------------------------------------------------------------------------------------
    def _on_request(self, request: ScheduleRequest, took: float, pipe) -> None:
        rid = request.request_id
        try:
            request.validate(self.limits)
        except SchemaError as e:                               # dead-lettered; its client hears why
            self.transport.reply_error(request.gateway, rid, str(e), pipe)
            raise
        try:
            # The tokenizer service validated the prompt; checked again against the workers' own limits, so that
            # a stray message gets an error reply (and is dead-lettered) instead of breaking a plan or a worker.
            ids = self.input_processor.process(request.params, prompt_token_ids=request.prompt_token_ids)
        except ValueError as e:
            self.transport.reply_error(request.gateway, rid, str(e), pipe)
            raise SchemaError(f"schedule.prompt: {e}") from None
        if rid in self.seen or rid in self.aborted or (request.epoch and request.epoch != self.epoch):
            return                 # a repeat, aborted before it got here, or sent before this scheduler started
        choice = self.placement.choose(ids, {name: slot.scheduler for name, slot in self.workers.items()})
        slot = self.workers[choice.worker]
        try:
            slot.scheduler.add_request(rid, ids, request.params, self.input_processor.seed(request.params),
                                       request.priority, request.beam_search, ahead=request.probe)
        except ValueError as e:    # a valid request this pool cannot take (not seen: read again, answered again)
            self.transport.reply_error(request.gateway, rid, str(e), pipe)
            return
        self.placed[slot.name, choice.reason] += 1
        self.where[rid] = slot.name
        if request.beam_search is not None:
            self.beams[rid] = (request.params, request.beam_search)
        self.seen.add(rid)
        self.gateways[rid] = request.gateway
        self.stamps[rid] = [request.arrival, request.tokenizer_took, took]

    def _on_abort(self, abort: Abort) -> None:
        if abort.index is None:
            self.aborted.add(abort.request_id)
        slot = self.workers.get(self.where.get(abort.request_id, ""))
        if slot is not None:
            seqs = slot.scheduler.requests.get(abort.request_id)
            if abort.index is None:
                slot.scheduler.abort_request(abort.request_id)
            elif seqs:                                         # a stop string ended one completion
                for seq in seqs:
                    if seq.index == abort.index:
                        slot.scheduler.finish(seq, FinishReason.STOP, abort.stop_reason)
        for orphan in self.orphans:                            # one waiting for a worker: ends before it moves
            if orphan.request_id == abort.request_id:
                orphan.seqs = [] if abort.index is None else [s for s in orphan.seqs if s.index != abort.index]
        self.orphans = [o for o in self.orphans if o.seqs]
        self._forget_finished()

    def _on_resume(self, resume: Resume, pipe) -> None:
        rid = resume.request_id
        if rid not in self.gateways:
            self.transport.reply_error(resume.gateway, rid, f"request {rid} is no longer running: it finished, was "
                                       "cancelled, or its gateway's grace period ended", pipe, code=404,
                                       type="not_found_error")
            return
        previous = self.owners.get(rid, self.gateways[rid])
        self.owners[rid] = resume.gateway
        if previous != resume.gateway:                         # it stops streaming the request (no abort)
            self.transport.reply_error(previous, rid, "this stream was resumed on another connection", pipe,
                                       code=409, type=RESUMED_ELSEWHERE)

    def _on_event(self, slot: WorkerSlot, event: StepEvent) -> None:
        scheduler = slot.scheduler
        plan = slot.outstanding.get(event.plan_id)
        if plan is None:
            return                                             # a plan of a worker that is gone
        # Checked before anything is applied: a stray event must not end (or grow) another plan's sequences.
        stray = set(event.seq_ids) - set(plan.num_scheduled_tokens) - {f.child_id for f in plan.forks}
        if stray:
            raise SchemaError(f"step_event: sequences {sorted(stray)[:5]} are not in plan {event.plan_id}")
        # A beam samples once a plan, and must bring its candidates (checked before anything is applied).
        candidates = {s: TokenLogprobs(0.0, list(zip(c.top_token_ids, c.top_logprobs)))
                      for s, c in zip(event.beam_seq_ids, event.beam_candidates)}
        for seq_id, tokens in zip(event.seq_ids, event.token_ids):
            seq = scheduler.get_sequence(seq_id)
            group = scheduler.beam_groups.get(seq.request_id) if seq is not None else None
            if group is not None and group.is_beam(seq) and (len(tokens) > 1 or seq_id not in candidates):
                raise SchemaError(f"step_event: beam {seq_id} must sample once, with its candidates")
        del slot.outstanding[event.plan_id]
        scheduler.cut(plan, event.num_steps_run)
        steps = max(map(len, event.token_ids), default=0)
        for step in range(steps):
            pairs = [(s, tokens[step]) for s, tokens in zip(event.seq_ids, event.token_ids) if step < len(tokens)]
            logprobs = [candidates.get(s) for s, _ in pairs] if candidates and step == 0 else None
            scheduler.update(StepResult([s for s, _ in pairs], [t for _, t in pairs], logprobs))
        for search in scheduler.take_finished_beam_searches():
            self._publish_beams(search)
        self._forget_finished()

    def _publish_beams(self, search: BeamSearchResult) -> None:
        """A finished beam search's best n beams, to the request's detokenizer partition as any tokens: the beams'
        tokens are known only here, and only now (streamed, a client gets every beam's chunks once it ends)."""
        rid = search.request_id
        columns = StepTokens(step=0, request_ids=[], indexes=[], positions=[], token_ids=[], finish_reasons=[],
                             stop_reasons=[], num_cached_tokens=[])
        for index, beam in enumerate(search.beams):
            tokens = beam.output_token_ids
            for position, token in enumerate(tokens):
                last = position == len(tokens) - 1
                columns.request_ids.append(rid)
                columns.indexes.append(index)
                columns.positions.append(position)
                columns.token_ids.append(token)
                columns.finish_reasons.append(beam.finish_reason.value if last else None)
                columns.stop_reasons.append(beam.stop_reason if last else None)
                columns.num_cached_tokens.append(0)
        self.transport.publish(self.names.tokens(partition_of(rid, self.partitions)), encode(columns))
        self.beam_searches += 1
        self.beam_kv_blocks_saved_peak += search.kv_blocks_saved

    def _forget_finished(self) -> None:
        orphans = {o.request_id for o in self.orphans}
        for rid in [r for r in self.gateways if r not in orphans and (
                (slot := self.workers.get(self.where.get(r, ""))) is None or r not in slot.scheduler.requests)]:
            del self.gateways[rid]
            self.where.pop(rid, None)
            self.beams.pop(rid, None)
            self.owners.pop(rid, None)
            self.stamps.pop(rid, None)

    # ---- dead gateways -------------------------------------------------------------------------------------
    def _reap(self) -> None:
        """Abort the requests whose owner has been dead for the grace period, and delete the reply streams of
        gateways dead for longer still that no request in flight writes to."""
        now = time.monotonic()
        if now < self._reap_at or not self.workers:
            return
        self._reap_at = now + REAP_EVERY_S
        redis = self.transport.redis
        if now >= self._list_streams_at:
            self._list_streams_at = now + REPLY_STREAMS_EVERY_S
            self.reply_streams = {self.names.gateway_of_reply(k.decode())
                                  for k in redis.scan_iter(match=self.names.reply("*"), count=1000)}
        owners = {rid: self.owners.get(rid, gateway) for rid, gateway in self.gateways.items()}
        gateways = sorted(set(owners.values()) | self.reply_streams)
        if not gateways:
            return
        beats = redis.mget([self.names.alive("gateway", g) for g in gateways])
        for gateway, beat in zip(gateways, beats):
            if beat is not None:
                self.gone_since.pop(gateway, None)
        for seen in (self.gone_since, self.last_written):
            for gateway in [g for g in seen if g not in gateways]:
                del seen[gateway]                              # nothing of it left to watch
        gone = {g: now - self.gone_since.setdefault(g, now) for g, beat in zip(gateways, beats) if beat is None}
        expired = {g for g, seconds in gone.items() if seconds >= self.resume_grace_s}
        orphans = [rid for rid, owner in owners.items() if owner in expired]
        for rid in orphans:
            self._on_abort(Abort(rid))
        if orphans:
            log.warning("aborted %d requests of gateways gone for %.0f s (%s): nobody resumed them", len(orphans),
                        self.resume_grace_s, ", ".join(sorted({owners[r] for r in orphans})))
        for gateway in set(self.gateways.values()):
            self.last_written[gateway] = now
        stale = [g for g in self.reply_streams if gone.get(g, 0.0) >= self.resume_grace_s
                 and now - self.last_written.get(g, -REPLY_STREAM_LINGER_S) >= REPLY_STREAM_LINGER_S]
        if stale:
            redis.delete(*[self.names.reply(g) for g in stale])
            self.reply_streams -= set(stale)
            for gateway in stale:
                self.last_written.pop(gateway, None)
            log.info("deleted the reply streams of gateways gone for good: %s", ", ".join(stale))

    # ---- output --------------------------------------------------------------------------------------------
    def _plan(self, slot: WorkerSlot) -> bool:
        """Make and send a worker's next plan; False when there was nothing to send."""
        plan = slot.scheduler.schedule()
        if plan.is_empty and not plan.freed_seq_ids and not plan.beam_steps:
            return False
        now = time.time()
        seqs = [slot.scheduler.get_sequence(n.seq_id) for n in plan.new]
        new_stamps = []
        for seq in seqs:
            stamps = self.stamps.pop(seq.request_id, None)          # None: sent again after preemption
            if stamps is not None:
                self._observe_queue_time(now - stamps[0])
                stamps.append(now)
            new_stamps.append(stamps or [])
        children = [slot.scheduler.get_sequence(f.child_id) for f in plan.forks]
        message = PlanMessage(
            plan_id=self.next_plan_id, worker_epoch=slot.epoch, scheduler_epoch=self.epoch,
            num_steps=plan.num_steps, new=plan.new, new_request_ids=[s.request_id for s in seqs],
            new_indexes=[s.index for s in seqs], running=plan.running,
            scheduled_seq_ids=list(plan.num_scheduled_tokens), scheduled_tokens=list(plan.num_scheduled_tokens.values()),
            forks=plan.forks, fork_indexes=[c.index for c in children], block_copies=plan.block_copies,
            freed_seq_ids=plan.freed_seq_ids, new_stamps=new_stamps, beam_steps=plan.beam_steps)
        if not plan.is_empty:                                  # an empty plan (only frees) gets no event
            slot.outstanding[self.next_plan_id] = plan
        self.next_plan_id += 1
        slot.unsent.append(encode(message))
        self._send_plans()
        return True

    def _send_plans(self) -> None:
        """The plans made, to their workers, in order. A plan counts as made (outstanding) before it is sent: if
        Redis is gone, it waits here until Redis is back (a reply lost after the XADD ran sends it twice; the
        worker drops the repeat)."""
        for slot in self.workers.values():
            while slot.unsent:
                self.transport.publish(self.names.plan(slot.name), slot.unsent[0])
                slot.unsent.popleft()

    def _observe_queue_time(self, seconds: float) -> None:
        self.queue_time_sum += seconds
        for i, bound in enumerate(QUEUE_TIME_BUCKETS):
            if seconds <= bound:
                self.queue_time_counts[i] += 1
                return
        self.queue_time_counts[-1] += 1

    def _publish_stats(self) -> None:
        """The deployment's figures (summed over the workers) and each worker's own (fields worker:<name>:...)."""
        now = time.monotonic()
        if now - self._stats_at < STATS_EVERY_S or not self.workers:
            return
        self._stats_at = now
        fields: dict = {"workers": len(self.workers), "migrated": self.migrated,
                        "queue_time_sum": self.queue_time_sum, "queue_time_count": sum(self.queue_time_counts),
                        "beam_searches": self.beam_searches,
                        "beam_kv_blocks_saved_peak": self.beam_kv_blocks_saved_peak}
        summed, waste = Counter(self.retired), 0.0
        for name, slot in self.workers.items():
            s = slot.scheduler.stats()
            own = {"running": s.num_running, "waiting": s.num_waiting, "preemptions": s.num_preemptions,
                   "kv_blocks_total": s.kv.num_blocks, "kv_blocks_used": s.kv.num_used_blocks,
                   "prefix_cache_queries": s.kv.prefix_queries, "prefix_cache_hits": s.kv.prefix_hits,
                   "beam_kv_blocks_saved": s.beam_kv_blocks_saved}
            summed.update(own)
            waste += s.kv_slot_waste * s.kv.num_used_blocks
            own.update(kv_usage=s.kv.usage, prefix_cache_hit_rate=s.kv.prefix_hit_rate)
            fields.update({f"worker:{name}:{key}": value for key, value in own.items()})
        for (name, reason), count in self.placed.items():          # a lost worker's too: counters never go down
            fields[f"worker:{name}:placed:{reason}"] = count
        fields.update(summed)
        fields["kv_usage"] = summed["kv_blocks_used"] / max(1, summed["kv_blocks_total"])
        fields["kv_slot_waste"] = waste / max(1, summed["kv_blocks_used"])      # weighted by the blocks in use
        fields["prefix_cache_hit_rate"] = summed["prefix_cache_hits"] / max(1, summed["prefix_cache_queries"])
        cumulative = 0
        for bound, count in zip([*QUEUE_TIME_BUCKETS, "+Inf"], self.queue_time_counts):
            cumulative += count
            fields[f"queue_time_bucket:{bound}"] = cumulative
        redis = self.transport.redis
        redis.hset(self.names.scheduler_stats, mapping={k: str(v) for k, v in fields.items()})
        gone = self._stats_fields - fields.keys()             # a lost worker's
        if gone:
            redis.hdel(self.names.scheduler_stats, *gone)
        self._stats_fields = set(fields)

    # ---- the workers ---------------------------------------------------------------------------------------
    def _track_workers(self) -> None:
        """Lose the workers whose heartbeat is gone or whose epoch changed (their requests move), and take on the
        registered workers that are alive and not driven yet."""
        names = self.names
        if self.workers:
            beats = self.transport.redis.mget([names.alive("worker", w) for w in self.workers])
            for (name, slot), beat in zip(list(self.workers.items()), beats):
                if beat is None and self.transport.restarted_recently():
                    continue       # expired while a restarted Redis was down: the worker beats again in a moment
                if beat is None or beat.decode() != slot.epoch:
                    self._lose(slot, "stopped" if beat is None else "restarted")
        now = time.monotonic()
        if now < self._workers_at and self.workers:
            return
        self._workers_at = now + WORKERS_EVERY_S
        for name, epoch in self.transport.live_workers().items():
            if name not in self.workers and (info := self.transport.worker_info(name)) is not None \
                    and info.epoch == epoch:
                self._take_on(info)
        if self.workers and self.orphans:
            self._place_orphans()

    def _take_on(self, info: WorkerInfo) -> None:
        limits = Limits.of(info)
        first = next(iter(self.workers.values()), None)
        if first is not None and (limits.vocab_size, limits.max_model_len, limits.block_size) != (
                first.limits.vocab_size, first.limits.max_model_len, first.limits.block_size):
            log.error("worker %s serves another model (vocabulary %d, max_model_len %d, block size %d) than %s: "
                      "not used", info.worker, limits.vocab_size, limits.max_model_len, limits.block_size,
                      first.name)
            return
        blocks = BlockManager(info.num_blocks, info.block_size, self.enable_prefix_caching)
        scheduler = Scheduler(self.config.for_device(info.device), blocks, info.max_model_len,
                              frozenset(info.eos_token_ids))
        self.workers[info.worker] = WorkerSlot(info.worker, info.epoch, scheduler, limits)
        if first is None:
            self.limits = Limits(info.vocab_size, info.max_model_len)
            if self.input_processor is None or (self.input_processor.max_model_len, self.input_processor.vocab_size
                                                ) != (info.max_model_len, info.vocab_size):
                self.input_processor = InputProcessor(None, info.max_model_len, info.vocab_size, self.seed)
        log.info("worker %s (epoch %s): %d KV blocks of %d, max_model_len %d; %d workers", info.worker,
                 info.epoch[:8], info.num_blocks, info.block_size, info.max_model_len, len(self.workers))

    def _lose(self, slot: WorkerSlot, how: str) -> None:
        """A worker is gone with its KV pool: every request it held waits for a live worker (now, if there is
        one), with the tokens known here."""
        del self.workers[slot.name]
        self.placement.forget(slot.name)
        s = slot.scheduler.stats()
        self.retired.update({"preemptions": s.num_preemptions, "prefix_cache_queries": s.kv.prefix_queries,
                             "prefix_cache_hits": s.kv.prefix_hits})
        # A worker that only stalled would come back holding sequences nobody schedules: its registration goes,
        # which tells it to stop and start afresh (WorkerService._still_registered).
        info = self.transport.worker_info(slot.name)
        if info is not None and info.epoch == slot.epoch:
            self.transport.redis.delete(self.names.worker_info(slot.name))
        moved = 0
        for rid, seqs in slot.scheduler.requests.items():
            self.where.pop(rid, None)
            beam_search = self.beams.get(rid)
            unfinished = [s for s in seqs if not s.is_finished]
            # A beam search starts again from its prompt (its beams were never streamed).
            self.orphans.append(Orphan(rid, unfinished[:1] if beam_search else self._as_streamed(unfinished),
                                       beam_search))
            moved += 1
        self.orphans = [o for o in self.orphans if o.seqs]
        log.warning("worker %s %s: its %d requests move to %s", slot.name, how, moved,
                    ", ".join(self.workers) or "the next worker to register")
        self._place_orphans()

    def _as_streamed(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences with the tokens their clients got: a plan's steps are streamed as they end and its event
        comes after its last, so the detokenizers' checkpoints may hold a few tokens more than are known here.
        Those are taken as they are, not computed again (a GPU's numerics may differ with the batch). A completion
        the detokenizers finished is over."""
        pipe = self.transport.redis.pipeline(transaction=False)
        for seq in seqs:
            pipe.exists(self.names.detok_state(seq.request_id, seq.index))
            pipe.lrange(self.names.detok_handled(seq.request_id, seq.index), 0, -1)
        replies = pipe.execute()
        kept = []
        for seq, finished, handled in zip(seqs, replies[::2], replies[1::2]):
            if finished:
                continue
            streamed = [int(pair.split()[0]) for pair in handled]
            known = seq.output_token_ids
            if streamed[:len(known)] == known[:len(streamed)]:
                seq.token_ids.extend(streamed[len(known):])
            else:                                  # not this sequence's (cannot happen): keep what is known here
                log.error("request %s: the tokens streamed differ from those known; continuing from the known",
                          seq.request_id)
            kept.append(seq)
        return kept

    def _place_orphans(self) -> None:
        schedulers = {name: slot.scheduler for name, slot in self.workers.items()}
        if not schedulers:
            return
        for orphan in self.orphans:
            first = orphan.seqs[0]
            choice = self.placement.choose(first.token_ids, schedulers)
            slot = self.workers[choice.worker]
            if orphan.beam_search is not None:
                params, beam_search = orphan.beam_search
                slot.scheduler.add_request(orphan.request_id, first.token_ids[:first.num_prompt_tokens], params,
                                           first.seed, first.priority, beam_search)
            else:
                slot.scheduler.adopt(orphan.seqs)
            self.placed[slot.name, "migrated"] += 1
            self.where[orphan.request_id] = slot.name
            self.migrated += 1
        self.orphans = []
        self._forget_finished()


def run(args: argparse.Namespace) -> int:
    setup_logging("scheduler")
    from services.cli import scheduler_config
    transport = Transport(args.redis_url, args.prefix, partitions=args.partitions)
    SchedulerService(transport, scheduler_config(args), args.enable_prefix_caching, args.seed, args.resume_grace,
                     args.partitions, args.placement).run(stop_event())
    return 0
