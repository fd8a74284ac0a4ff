"""The scheduler service: the engine's Scheduler and block accounting for one worker, one plan ahead of it.

It reads three streams in one call: new requests (schedule), aborts (abort) and the worker's per-plan events
(events:<worker>). It keeps two plans outstanding: while the worker runs plan r, plan r+1 already waits in its
stream, made before r's tokens were known (their tokens count as in flight, see engine.scheduler). So the worker
never waits for the scheduler, and the scheduler never waits for a token it does not need. A prompt that can be
admitted does not wait for those two: it goes out at once in a third plan, and the worker ends the running plan at
its next step boundary and runs none of the queued one if it only decodes (each event says how many steps ran;
Scheduler.cut takes back the rest).

If the worker dies or restarts (its heartbeat's epoch changes), every request it held is lost: the gateways
fail them (they watch the same heartbeats) and this service starts over with the new worker's KV pool.

Redis going away stops nothing held here: the loop waits it out (runtime.keep_running), reads its pending
entries again (a repeated request or abort is dropped, an event for a plan no longer outstanding too), and a plan
made meanwhile waits in `unsent` until Redis takes it, in order (sent twice, the worker drops the repeat by its
plan id).

Each request has an owner, the gateway streaming it: first the one that took it, then any that took it over
(Resume: its client came back there with Last-Event-ID, see services/resumable.py). When an owner's heartbeat is
gone for the grace period (--resume-grace), its requests nobody took over are aborted; a dead gateway's reply
stream is deleted once no request in flight writes to it any more.

What it reads is trusted no further than its schema and value ranges, against the worker's limits (WorkerInfo):
a request, abort or event that fails is dead-lettered (a request's gateway gets an error reply too), and the
requests in flight go on as if it never came.
"""
from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections import OrderedDict, deque

from engine.beam_search import BeamSearchResult
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.input_processor import InputProcessor
from engine.plan import Plan, StepResult, TokenLogprobs
from engine.scheduler import Scheduler
from engine.sequence import FinishReason
from schemas.codec import SchemaError, decode, encode
from schemas.limits import Limits
from schemas.messages import RESUMED_ELSEWHERE, Abort, PlanMessage, Resume, ScheduleRequest, StepEvent, StepTokens
from services.runtime import Heartbeat, keep_running, setup_logging, stop_event
from services.transport import Entry, Transport, Trimmer, instance_id, partition_of

log = logging.getLogger("pagestream.scheduler")

GROUP = "scheduler"
MAX_OUTSTANDING_PLANS = 2          # the one running and the next, waiting in the worker's stream
MAX_OUTSTANDING_WITH_PROMPTS = 3   # plus one that admits prompts at the running plans' next step boundary
STATS_EVERY_S = 0.5
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


class SchedulerService:
    def __init__(self, transport: Transport, config: SchedulerConfig, worker: str, enable_prefix_caching: bool,
                 seed: int = 0, resume_grace_s: float = 30.0, partitions: int = 8):
        self.transport, self.names = transport, transport.names
        self.partitions = partitions                       # the detokenizers': finished beam searches go there
        self.beam_searches = self.beam_kv_blocks_saved_peak = 0
        self.config, self.worker, self.enable_prefix_caching = config, worker, enable_prefix_caching
        self.epoch = uuid.uuid4().hex
        self.consumer = instance_id("scheduler")
        self.seed = seed
        self.scheduler: Scheduler | None = None
        self.input_processor: InputProcessor | None = None     # the worker's limits; chooses unseeded requests' seeds
        self.limits: Limits | None = None                      # the worker's vocabulary, KV pool, max_model_len
        self.worker_epoch: str | None = None
        self.outstanding: OrderedDict[int, Plan] = OrderedDict()     # plan id -> plan, in order
        self.unsent: deque[bytes] = deque()                # plans made but not yet in the worker's stream
        self.next_plan_id = 0
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

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, stop) -> None:
        Heartbeat(self.transport, self.names.alive("scheduler"), self.epoch, stop).start()
        streams = [self.names.events(self.worker), self.names.abort, self.names.resume, self.names.schedule]
        log.info("scheduler %s (epoch %s) for worker %s", self.consumer, self.epoch[:8], self.worker)
        trim = Trimmer(self.transport, streams)
        idle = True

        def iteration() -> None:
            nonlocal idle
            trim()
            if not self._worker_is_current():
                self._wait_for_worker(stop)
                return
            self._send_plans()
            # Don't wait for input when a plan can go out now; otherwise block until something arrives.
            entries = self.transport.read(streams, GROUP, self.consumer, count=512, block_ms=50 if idle else None)
            self._handle(entries)
            room = len(self.outstanding) < MAX_OUTSTANDING_PLANS or (
                len(self.outstanding) < MAX_OUTSTANDING_WITH_PROMPTS and self.scheduler.has_prompt_work())
            planned = room and self._plan()
            idle = not planned and not entries
            self._publish_stats()
            self._reap()

        keep_running(stop, iteration, "scheduler", self.transport)

    def _handle(self, entries: list[Entry]) -> None:
        pipe = self.transport.pipeline()
        took = time.time()
        for entry in entries:
            try:
                if entry.stream == self.names.events(self.worker):
                    self._on_event(decode(StepEvent, entry.payload, self.limits))
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
            # The tokenizer service validated the prompt; checked again against the worker's own limits, so that
            # a stray message gets an error reply (and is dead-lettered) instead of breaking a plan or the worker.
            ids = self.input_processor.process(request.params, prompt_token_ids=request.prompt_token_ids)
        except ValueError as e:
            self.transport.reply_error(request.gateway, rid, str(e), pipe)
            raise SchemaError(f"schedule.prompt: {e}") from None
        if rid in self.seen or rid in self.aborted or (request.epoch and request.epoch != self.epoch):
            return                 # a repeat, aborted before it got here, or sent before this scheduler started
        try:
            self.scheduler.add_request(rid, ids, request.params, self.input_processor.seed(request.params),
                                       request.priority, request.beam_search)
        except ValueError as e:    # a valid request this pool cannot take (not seen: read again, answered again)
            self.transport.reply_error(request.gateway, rid, str(e), pipe)
            return
        self.seen.add(rid)
        self.gateways[rid] = request.gateway
        self.stamps[rid] = [request.arrival, request.tokenizer_took, took]

    def _on_abort(self, abort: Abort) -> None:
        seqs = self.scheduler.requests.get(abort.request_id)
        if abort.index is None:
            self.aborted.add(abort.request_id)
            self.scheduler.abort_request(abort.request_id)
        elif seqs:                                             # a stop string ended one completion
            for seq in seqs:
                if seq.index == abort.index:
                    self.scheduler.finish(seq, FinishReason.STOP, abort.stop_reason)
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

    def _on_event(self, event: StepEvent) -> None:
        plan = self.outstanding.get(event.plan_id)
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
            seq = self.scheduler.get_sequence(seq_id)
            group = self.scheduler.beam_groups.get(seq.request_id) if seq is not None else None
            if group is not None and group.is_beam(seq) and (len(tokens) > 1 or seq_id not in candidates):
                raise SchemaError(f"step_event: beam {seq_id} must sample once, with its candidates")
        del self.outstanding[event.plan_id]
        self.scheduler.cut(plan, event.num_steps_run)
        steps = max(map(len, event.token_ids), default=0)
        for step in range(steps):
            pairs = [(s, tokens[step]) for s, tokens in zip(event.seq_ids, event.token_ids) if step < len(tokens)]
            logprobs = [candidates.get(s) for s, _ in pairs] if candidates and step == 0 else None
            self.scheduler.update(StepResult([s for s, _ in pairs], [t for _, t in pairs], logprobs))
        for search in self.scheduler.take_finished_beam_searches():
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
        for rid in [r for r in self.gateways if r not in self.scheduler.requests]:
            del self.gateways[rid]
            self.owners.pop(rid, None)
            self.stamps.pop(rid, None)

    # ---- dead gateways -------------------------------------------------------------------------------------
    def _reap(self) -> None:
        """Abort the requests whose owner has been dead for the grace period, and delete the reply streams of
        gateways dead for longer still that no request in flight writes to."""
        now = time.monotonic()
        if now < self._reap_at or self.scheduler is None:
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
    def _plan(self) -> bool:
        """Make and send the next plan; False when there was nothing to send."""
        plan = self.scheduler.schedule()
        if plan.is_empty and not plan.freed_seq_ids and not plan.beam_steps:
            return False
        now = time.time()
        seqs = [self.scheduler.get_sequence(n.seq_id) for n in plan.new]
        new_stamps = []
        for seq in seqs:
            stamps = self.stamps.pop(seq.request_id, None)          # None: sent again after preemption
            if stamps is not None:
                self._observe_queue_time(now - stamps[0])
                stamps.append(now)
            new_stamps.append(stamps or [])
        children = [self.scheduler.get_sequence(f.child_id) for f in plan.forks]
        message = PlanMessage(
            plan_id=self.next_plan_id, worker_epoch=self.worker_epoch, scheduler_epoch=self.epoch,
            num_steps=plan.num_steps, new=plan.new, new_request_ids=[s.request_id for s in seqs],
            new_indexes=[s.index for s in seqs], running=plan.running,
            scheduled_seq_ids=list(plan.num_scheduled_tokens), scheduled_tokens=list(plan.num_scheduled_tokens.values()),
            forks=plan.forks, fork_indexes=[c.index for c in children], block_copies=plan.block_copies,
            freed_seq_ids=plan.freed_seq_ids, new_stamps=new_stamps, beam_steps=plan.beam_steps)
        if not plan.is_empty:                                  # an empty plan (only frees) gets no event
            self.outstanding[self.next_plan_id] = plan
        self.next_plan_id += 1
        self.unsent.append(encode(message))
        self._send_plans()
        return True

    def _send_plans(self) -> None:
        """The plans made, to the worker, in order. A plan counts as made (outstanding) before it is sent: if
        Redis is gone, it waits here until Redis is back (a reply lost after the XADD ran sends it twice; the
        worker drops the repeat)."""
        while self.unsent:
            self.transport.publish(self.names.plan(self.worker), self.unsent[0])
            self.unsent.popleft()

    def _observe_queue_time(self, seconds: float) -> None:
        self.queue_time_sum += seconds
        for i, bound in enumerate(QUEUE_TIME_BUCKETS):
            if seconds <= bound:
                self.queue_time_counts[i] += 1
                return
        self.queue_time_counts[-1] += 1

    def _publish_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < STATS_EVERY_S or self.scheduler is None:
            return
        self._stats_at = now
        s = self.scheduler.stats()
        fields = {"running": s.num_running, "waiting": s.num_waiting, "preemptions": s.num_preemptions,
                  "kv_blocks_total": s.kv.num_blocks, "kv_blocks_used": s.kv.num_used_blocks,
                  "kv_usage": s.kv.usage, "kv_slot_waste": s.kv_slot_waste,
                  "prefix_cache_queries": s.kv.prefix_queries, "prefix_cache_hits": s.kv.prefix_hits,
                  "prefix_cache_hit_rate": s.kv.prefix_hit_rate, "queue_time_sum": self.queue_time_sum,
                  "queue_time_count": sum(self.queue_time_counts), "beam_kv_blocks_saved": s.beam_kv_blocks_saved,
                  "beam_searches": self.beam_searches, "beam_kv_blocks_saved_peak": self.beam_kv_blocks_saved_peak}
        cumulative = 0
        for bound, count in zip([*QUEUE_TIME_BUCKETS, "+Inf"], self.queue_time_counts):
            cumulative += count
            fields[f"queue_time_bucket:{bound}"] = cumulative
        self.transport.redis.hset(self.names.scheduler_stats, mapping={k: str(v) for k, v in fields.items()})

    # ---- the worker ----------------------------------------------------------------------------------------
    def _worker_is_current(self) -> bool:
        if self.scheduler is None:
            return False
        alive = self.transport.redis.get(self.names.alive("worker", self.worker))
        if alive is None:          # expired while a restarted Redis was down: the worker beats again in a moment
            return self.transport.restarted_recently()
        return alive.decode() == self.worker_epoch

    def _wait_for_worker(self, stop) -> None:
        """(Re)start from the live worker's registration: a fresh KV pool, nothing in flight."""
        if self.scheduler is not None:
            log.warning("worker %s is gone or restarted: dropping %d requests", self.worker,
                        len(self.scheduler.requests))
        self.scheduler, self.outstanding = None, OrderedDict()
        self.unsent.clear()
        self.gateways.clear()
        self.stamps.clear()
        while not stop.is_set():
            alive = self.transport.redis.get(self.names.alive("worker", self.worker))
            info = self.transport.worker_info(self.worker)
            if alive is not None and info is not None and info.epoch == alive.decode():
                break
            stop.wait(0.2)
        else:
            return
        self.worker_epoch = info.epoch
        blocks = BlockManager(info.num_blocks, info.block_size, self.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.for_device(info.device), blocks, info.max_model_len,
                                   frozenset(info.eos_token_ids))
        self.input_processor = InputProcessor(None, info.max_model_len, info.vocab_size, self.seed)
        self.limits = Limits.of(info)
        log.info("worker %s (epoch %s): %d KV blocks of %d, max_model_len %d", self.worker, info.epoch[:8],
                 info.num_blocks, info.block_size, info.max_model_len)



def run(args: argparse.Namespace) -> int:
    setup_logging("scheduler")
    from services.cli import scheduler_config
    transport = Transport(args.redis_url, args.prefix, partitions=args.partitions)
    SchedulerService(transport, scheduler_config(args), args.worker_name, args.enable_prefix_caching,
                     args.seed, args.resume_grace, args.partitions).run(stop_event())
    return 0
