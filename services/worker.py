"""The GPU worker service: runs the scheduler's plans, publishes every step's tokens as they come.

It registers its KV pool (WorkerInfo) and beats a heartbeat whose value is its epoch. Its parts:
- the plan reader (a thread) takes plans from Redis into an inbox, so the model loop never waits on Redis;
- the model loop runs each plan's k steps (in order, one plan at a time). Between steps it looks at the inbox:
  when a plan with new prompts waits, the running plan ends at that step boundary (the scheduler takes the
  skipped steps back when it learns how many ran), so a prompt never waits for a plan of decode steps to end; a
  plan of decode steps queued ahead of it (the scheduler stays one plan ahead) then runs none of its steps;
- the publisher (services/publisher.py, a process of its own, fed through a pipe by a writer thread) turns each
  step's tokens, as they reach the host, into one columnar StepTokens message per detokenizer partition, so step
  n's tokens are on their way while step n+1 runs and the model loop spends no time on them. After a plan's last
  step, one StepEvent tells the scheduler what every sequence sampled, acknowledged together with the plan.
Sequences that end inside a plan (EOS, a stop token, max_tokens) are masked by the runner: their later tokens
are neither computed nor published.

Redis going away stops no step: the model loop never waits on Redis, the plan reader waits it out and then reads
its pending plans again, and the publisher sends each batch again until Redis takes it, in order. A plan read
twice that way, or sent twice by a scheduler that retried, is dropped by the model loop: a scheduler's plan ids
only grow, so one not above the last plan run for that scheduler is a repeat.

A plan is trusted no further than its schema and its value ranges (PlanMessage.validate, against this worker's
vocabulary and KV pool) and what the worker holds (plan_problem: the sequences it runs exist, the blocks they
write are theirs): one that fails is dead-lettered, and the sequences in flight go on as if it never came.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque

import torch

from engine.collector import frozen_heap
from engine.config import EngineConfig
from engine.host_stalls import HostStalls
from engine.model_files import resolve_model
from engine.model_runner import ModelRunner
from engine.plan import Plan, StepResult
from engine.structured_output import Grammars
from engine.tokenizer import eos_token_ids, load_tokenizer
from engine.warmup import warm_up
from schemas.codec import SchemaError, decode, encode
from schemas.limits import Limits
from schemas.messages import PlanMessage, StepEvent, TokenLogprobsWire, WorkerInfo
from services.publisher import write_frame
from services.runtime import Heartbeat, keep_running, setup_logging, stop_event, until_done
from services.step_stats import StepStats
from services.transport import REDIS_DOWN, REDIS_URL_ENV, Transport, Trimmer, instance_id, partition_of

log = logging.getLogger("pagestream.worker")

GROUP = "worker"
REGISTRATION_CHECK_S = 1.0         # how often the plan reader looks whether the scheduler gave this worker up
PENDING_POLL_S = 0.0002            # while a step runs on the GPU and no plan waits: how often to look at the GPU


class PlanInbox:
    """Plans taken from Redis by the reader thread, waiting for the model loop. It counts the waiting plans
    that bring new prompts: the model loop reads that count between steps, which costs no lock and no I/O."""

    def __init__(self):
        self._plans: deque[tuple[PlanMessage, bytes]] = deque()
        self._ready = threading.Condition()
        self.num_with_new_prompts = 0

    def put(self, message: PlanMessage, entry_id: bytes) -> None:
        with self._ready:
            self._plans.append((message, entry_id))
            self.num_with_new_prompts += bool(message.new)
            self._ready.notify()

    def get(self, timeout: float) -> tuple[PlanMessage, bytes] | None:
        with self._ready:
            if not self._ready.wait_for(lambda: self._plans, timeout):
                return None
            message, entry_id = self._plans.popleft()
            self.num_with_new_prompts -= bool(message.new)
            return message, entry_id


class WorkerService:
    def __init__(self, transport: Transport, config: EngineConfig, worker: str, partitions: int):
        self.transport, self.names = transport, transport.names
        self.config, self.worker, self.partitions = config, worker, partitions
        self.epoch = uuid.uuid4().hex
        self.consumer = instance_id("worker")
        # seq id -> [seq id, request id, completion index, prompt tokens from the cache, detokenizer partition]
        self.owners: dict[int, list] = {}
        self.scheduler_epoch: str | None = None
        self.step = 0
        # Frames for the publisher; steps it may fall behind by before the model loop waits for it.
        self.outbox: queue.Queue = queue.Queue(maxsize=1024)
        self.inbox = PlanInbox()
        self.first_stamps: dict[int, list[float]] = {}     # seq id -> its request's stamps, until its first token
        self.limits: Limits | None = None                  # this worker's vocabulary and KV pool, once loaded
        self.live_scheduler_epoch: str | None = None       # the epoch of the scheduler whose plans are taken
        self.stats: StepStats | None = None                # where the model loop's time goes (a diagnostic)
        self.last_plan_id = -1                             # the last plan run for scheduler_epoch

    def run(self, stop) -> None:
        mc = self.config.model
        files = resolve_model(mc.model, mc.load_format)
        tokenizer = load_tokenizer(files, mc.tokenizer)
        eos = eos_token_ids(files, tokenizer)
        grammars = Grammars(tokenizer, files.config["vocab_size"], eos)
        if grammars.available:
            grammars.load()           # xgrammar and the vocabulary, now: not in the middle of serving
        self.runner = ModelRunner(self.config, files.config, files.path, eos, grammars=grammars)
        r = self.runner
        if r.device.type == "cpu":
            # The other services of `pagestream serve` run on these cores too: torch's threads on all of them spin
            # against those (the warm-up, 0.5 s alone on two cores, took 9 s while they restarted), so one core
            # is theirs. A decode step reads every weight once: it is bound by memory, not by threads.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
        # Compile and cache every kernel variant a real load meets before saying we are here.
        log.info("warmed up in %.1f s", warm_up(r, self.config.scheduler, r.max_model_len, eos))
        info = WorkerInfo(self.worker, self.epoch, r.num_blocks, r.block_size, r.max_model_len, r.args.vocab_size,
                          sorted(eos), r.device.type)
        self.limits = Limits.of(info)
        # The heartbeat first: the scheduler takes on a registered worker whose heartbeat is alive.
        Heartbeat(self.transport, self.names.alive("worker", self.worker), self.epoch, stop).start()
        until_done(stop, lambda: self.transport.register_worker(info), "registering the worker")
        # The Redis URL (it may hold a password) in the environment, not on the command line.
        publisher = subprocess.Popen([sys.executable, "-m", "services.publisher", "--prefix", self.names.prefix,
                                      "--worker", self.worker], stdin=subprocess.PIPE,
                                     env={**os.environ, REDIS_URL_ENV: self.transport.url})
        threads = [threading.Thread(target=self._feed, args=(publisher, stop), name="pipe writer", daemon=True),
                   threading.Thread(target=self._read_plans, args=(stop,), name="plan reader", daemon=True)]
        for thread in threads:
            thread.start()
        log.info("worker %s (epoch %s) on %s: %d KV blocks", self.worker, self.epoch[:8], r.device, r.num_blocks)
        stalls = HostStalls(on_compile=_compiled_while_serving)
        self.stats = StepStats.from_env(r, stalls)
        with frozen_heap(), stalls:
            self._loop(stop)
        self.outbox.put(None)
        threads[0].join(timeout=10)
        try:
            publisher.wait(timeout=10)            # it ends once it has published what it was handed
        except subprocess.TimeoutExpired:
            publisher.kill()

    def _loop(self, stop) -> None:
        """The model loop: the next plan launched as soon as it comes, until stop."""
        r, stats = self.runner, self.stats
        while not stop.is_set():
            # A plan's last step stays on the GPU until the next plan is launched. With none waiting, wait for one
            # while the GPU still runs that step (a plan that comes meanwhile is launched first, so the GPU goes
            # straight on), and process the step once the GPU is done with it.
            pending = r.has_pending_outputs
            if pending and r.pending_outputs_on_host:
                r.flush()
                if stats:
                    stats.flushed()
                continue
            waiting = time.perf_counter() if stats else 0.0
            item = self.inbox.get(timeout=PENDING_POLL_S if pending else 0.1)
            if stats:
                stats.waited(time.perf_counter() - waiting, pending, item is not None)
                stats.tick()
            if item is not None:
                self._execute(*item)

    def _feed(self, publisher: subprocess.Popen, stop) -> None:
        """The pipe writer: frames from the outbox to the publisher process. If the publisher is gone, so is
        every token from now on: the worker stops (and is restarted, with a new epoch, by whoever runs it)."""
        while True:
            frame = self.outbox.get()
            try:
                if frame is None:
                    publisher.stdin.close()
                    return
                write_frame(publisher.stdin, frame)
                if self.outbox.empty():
                    publisher.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                log.error("the publisher process is gone (exit code %s): stopping", publisher.poll())
                stop.set()
                return

    def _read_plans(self, stop) -> None:
        plans = self.names.plan(self.worker)
        trim = Trimmer(self.transport, [plans])
        registered_at = time.monotonic()

        def iteration() -> None:
            nonlocal registered_at
            if time.monotonic() - registered_at > REGISTRATION_CHECK_S:
                registered_at = time.monotonic()
                if not self._still_registered():
                    log.error("the scheduler gave this worker up (its heartbeat stalled): stopping, to be started "
                              "afresh (its requests went on elsewhere)")
                    stop.set()
                    return
            entries = self.transport.read([plans], GROUP, self.consumer, count=16, block_ms=100)
            trim()
            for entry in entries:
                try:
                    message = decode(PlanMessage, entry.payload, self.limits)
                except SchemaError as e:
                    self.transport.dead_letter(plans, GROUP, entry.id, entry.payload, str(e))
                    continue
                # Made for a worker before this one, or by a scheduler that is not the live one (a new
                # scheduler epoch drops every sequence held: only the live scheduler may ask that).
                if message.worker_epoch != self.epoch or not self._from_live_scheduler(message):
                    self.transport.ack(plans, GROUP, [entry.id])
                    continue
                # Structured outputs: the grammar compiles in the background from now, while the plan waits in the
                # inbox and its prompt prefills; the model loop waits only if it is not ready when first needed.
                for new in message.new:
                    if new.params.structured_outputs is not None and self.runner.grammars.available:
                        self.runner.grammars.prefetch(new.params.structured_outputs)
                self.inbox.put(message, entry.id)

        keep_running(stop, iteration, "plan reader", self.transport)

    def _still_registered(self) -> bool:
        """False once the scheduler has given this worker up: it missed its heartbeat's deadline (a stall, not a
        death), its requests moved on, and its registration was withdrawn. The sequences it holds belong to no
        scheduler any more, so it stops and starts afresh, with a new epoch. (A registration lost with a restarted
        Redis is not that: the next heartbeats bring the scheduler back to it.)"""
        info = self.transport.worker_info(self.worker)
        return (info is not None and info.epoch == self.epoch) or self.transport.restarted_recently()

    def _from_live_scheduler(self, message: PlanMessage) -> bool:
        if message.scheduler_epoch != self.live_scheduler_epoch:          # asked once per scheduler epoch
            alive = self.transport.redis.get(self.names.alive("scheduler"))
            if alive is None or alive.decode() != message.scheduler_epoch:
                return False
            self.live_scheduler_epoch = message.scheduler_epoch
        return True

    def plan_problem(self, message: PlanMessage) -> str | None:
        """Why the plan cannot run on what this worker holds, or None: new sequences must be new, the others
        held; each scheduled sequence's tokens must fit its block table and max_model_len; a fork's parent must
        sample in this plan's first step. (The runner trusts all this: a plan that broke it would crash it, or
        write another sequence's KV blocks.) Run by the model loop, as the state it checks is the loop's."""
        self.runner.catch_up()
        held = self.runner.seqs if message.scheduler_epoch == self.scheduler_epoch else {}
        if message.forks and held:
            self.runner.flush()          # as the runner does before forking: every parent token is on the host
        freed = set(message.freed_seq_ids)
        # seq id -> [computed tokens, blocks in its table, tokens, finished, beam], as they will be when the plan
        # runs: only the sequences the plan names (a plan of the model loop's hot path: a few of hundreds held).
        state: dict[int, list] = {}

        def lookup(seq_id: int, freed: set[int] = freed) -> list | None:
            if seq_id not in state and seq_id in held and seq_id not in freed:
                q = held[seq_id]
                state[seq_id] = [q.num_computed_tokens, len(q.block_table), len(q.token_ids), q.finished, q.beam]
            return state.get(seq_id)

        # Beam steps come first: a new beam copies its parent (which this plan may free), as the runner does.
        for step in message.beam_steps:
            parent = lookup(step.parent_id, set())
            if parent is None or not parent[4] or parent[0] != parent[2]:
                return f"beam step {step.seq_id}: {step.parent_id} is not a beam whose candidates are in"
            if step.seq_id != step.parent_id and lookup(step.seq_id) is not None:
                return f"beam step {step.seq_id}: a new beam that is already held"
        for step in message.beam_steps:
            if step.seq_id != step.parent_id:
                state[step.seq_id] = list(state[step.parent_id])
        for step in message.beam_steps:
            state[step.seq_id][2] = state[step.seq_id][0] + 1
        for seq_id in freed:
            state.pop(seq_id, None)

        for new in message.new:
            if lookup(new.seq_id) is not None:
                return f"new sequence {new.seq_id} is already held"
            if new.params.structured_outputs is not None and not self.runner.grammars.available:
                return f"new sequence {new.seq_id} has structured outputs, and this worker has no tokenizer"
            state[new.seq_id] = [new.num_computed_tokens, len(new.block_ids), len(new.token_ids), False, new.beam]
        for run in message.running:
            seq = lookup(run.seq_id)
            if seq is None:
                return f"running sequence {run.seq_id} is not held"
            if run.block_offset > seq[1]:
                return f"running sequence {run.seq_id}: block offset {run.block_offset} beyond its block table"
            seq[1] = run.block_offset + len(run.new_block_ids)
        scheduled = dict(zip(message.scheduled_seq_ids, message.scheduled_tokens))
        block_size, max_len = self.limits.block_size, self.limits.max_model_len
        for seq_id, n in scheduled.items():
            seq = lookup(seq_id)
            if seq is None:
                return f"scheduled sequence {seq_id} is not held"
            computed, blocks, _, finished, _ = seq
            if not finished and computed + n > min(blocks * block_size, max_len):
                return (f"sequence {seq_id}: {computed + n} tokens exceed its {blocks} blocks of {block_size} "
                        f"or max_model_len {max_len}")
        for fork in message.forks:
            if lookup(fork.child_id) is not None:
                return f"fork child {fork.child_id} is already held"
            parent = lookup(fork.parent_id)
            if parent is None or parent[3] or fork.parent_id not in scheduled or \
                    parent[0] + scheduled[fork.parent_id] < parent[2]:
                return f"fork parent {fork.parent_id} does not sample in this plan"
            state[fork.child_id] = list(parent)
        return None

    def _execute(self, message: PlanMessage, entry_id: bytes) -> None:
        plan_started = time.time()
        if message.scheduler_epoch == self.scheduler_epoch and message.plan_id <= self.last_plan_id:
            self.outbox.put(["ack", entry_id])             # a repeat of a plan run already (see the docstring)
            return
        problem = self.plan_problem(message)
        if problem is not None:
            try:
                self.transport.dead_letter(self.names.plan(self.worker), GROUP, entry_id, encode(message), problem)
            except REDIS_DOWN:          # the model loop never waits for Redis: the plan stays pending, unrun
                log.error("plan %d refused (%s); Redis is gone, so it is not dead-lettered", message.plan_id,
                          problem)
            return
        if message.scheduler_epoch != self.scheduler_epoch:       # a new scheduler: nothing it knows of is held
            self.runner.seqs.clear()
            if self.owners:
                self.outbox.put(["owners", [], list(self.owners)])
            self.owners.clear()
            self.first_stamps.clear()
            self.scheduler_epoch = message.scheduler_epoch
        self.last_plan_id = message.plan_id
        added = []
        for new, rid, index in zip(message.new, message.new_request_ids, message.new_indexes):
            if new.beam:           # its tokens are the scheduler's to publish, when the search is over
                continue
            added.append([new.seq_id, rid, index, new.num_computed_tokens, partition_of(rid, self.partitions)])
            self.owners[new.seq_id] = added[-1]
        for fork, index in zip(message.forks, message.fork_indexes):    # a parent may be new in this plan
            _, rid, _, cached, partition = self.owners[fork.parent_id]
            added.append([fork.child_id, rid, index, cached, partition])
            self.owners[fork.child_id] = added[-1]
        if added:
            self.outbox.put(["owners", added, []])        # before any of their tokens
        for new, stamps in zip(message.new, message.new_stamps):
            if stamps:
                self.first_stamps[new.seq_id] = stamps + [plan_started]
        plan = Plan(num_steps=message.num_steps, new=message.new, running=message.running,
                    num_scheduled_tokens=dict(zip(message.scheduled_seq_ids, message.scheduled_tokens)),
                    forks=message.forks, block_copies=message.block_copies, freed_seq_ids=message.freed_seq_ids,
                    beam_steps=message.beam_steps)
        sampled: dict[int, list[int]] = {}
        candidates: dict[int, TokenLogprobsWire] = {}
        # Asked once a plan, not once a step: plans without beams run as they did before beam search.
        has_beams = any(self.runner.seqs[s].beam for s in plan.num_scheduled_tokens if s in self.runner.seqs) or \
            any(n.beam for n in message.new) or bool(message.beam_steps)

        def on_step(result: StepResult) -> None:
            on_host = time.time()
            seqs = self.runner.seqs
            if has_beams:          # the beams' candidates go to the scheduler, in the plan's event; no token of theirs
                for i, s in enumerate(result.seq_ids):
                    if seqs[s].beam:
                        top = result.logprobs[i].top
                        candidates[s] = TokenLogprobsWire(0.0, [t for t, _ in top], [v for _, v in top])
                        sampled[s] = [result.token_ids[i]]
                keep = [i for i, s in enumerate(result.seq_ids) if not seqs[s].beam]
                result = StepResult([result.seq_ids[i] for i in keep], [result.token_ids[i] for i in keep],
                                    None if result.logprobs is None else [result.logprobs[i] for i in keep])
            positions = [len(seqs[s].token_ids) - seqs[s].num_prompt_tokens - 1 for s in result.seq_ids]
            finishes = [seqs[s].finish for s in result.seq_ids]
            firsts = []
            if self.first_stamps:
                for s, position in zip(result.seq_ids, positions):
                    if position == 0 and s in self.first_stamps:
                        firsts.append([s, self.first_stamps.pop(s)])
            logprobs = None if result.logprobs is None else [
                [lp.logprob, [t for t, _ in lp.top], [v for _, v in lp.top]] for lp in result.logprobs]
            prompt_logprobs = [[s, seqs[s].token_ids[:seqs[s].num_prompt_tokens],
                                [[lp.logprob, [t for t, _ in lp.top], [v for _, v in lp.top]] for lp in entries],
                                [lp.rank for lp in entries]] for s, entries in result.prompt_logprobs.items()]
            self.outbox.put(["step", self.step, on_host, result.seq_ids, result.token_ids, positions,
                             [f[0].value if f else None for f in finishes], [f[1] if f else None for f in finishes],
                             logprobs, firsts, prompt_logprobs])
            self.step += 1
            for s, t in zip(result.seq_ids, result.token_ids):
                sampled.setdefault(s, []).append(t)

        def on_done(steps_run: int) -> None:
            # The plan's last step is on the host (with asynchronous output: while the next plan runs).
            seq_ids = list(sampled)
            finishes = [self.runner.seqs[s].finish if s in self.runner.seqs else None for s in seq_ids]
            event = StepEvent(message.plan_id, seq_ids, [sampled[s] for s in seq_ids],
                              [f[0].value if f else None for f in finishes], [f[1] if f else None for f in finishes],
                              num_steps_run=steps_run, beam_seq_ids=list(candidates),
                              beam_candidates=list(candidates.values()))
            self.outbox.put(["event", encode(event), entry_id])

        # A plan with new prompts waiting ends this one at the next step boundary, or, if this one only decodes,
        # before its first step: its steps were planned before those prompts arrived, and would delay them.
        self.runner.execute(plan, on_step, on_done, should_stop=lambda: self.inbox.num_with_new_prompts > 0,
                            may_skip=True)
        if self.stats:
            self.stats.plan_ran(plan.num_steps, self.runner.steps_run)
        # Only now are the freed sequences forgotten: execute() first hands over the tokens a preempted one
        # still had in flight, and the publisher drops their owners after those.
        dropped = [s for s in message.freed_seq_ids if self.owners.pop(s, None) is not None]
        for seq_id in message.freed_seq_ids:
            self.first_stamps.pop(seq_id, None)
        if dropped:
            self.outbox.put(["owners", [], dropped])


def _compiled_while_serving(kernel: str, seconds: float, variant: str) -> None:
    """A kernel compiled after the warm-up: every stream stood still meanwhile, and the warm-up missed a shape."""
    log.warning("Triton compiled %s while serving (%.0f ms, the GPU idle meanwhile): the warm-up missed this variant: "
                "%s", kernel, seconds * 1000, variant)


def run(args: argparse.Namespace) -> int:
    setup_logging("worker")
    from services.cli import engine_config
    transport = Transport(args.redis_url, args.prefix, partitions=args.partitions)
    name = f"{socket.gethostname()}-{os.getpid()}" if args.worker_name == "auto" else args.worker_name
    WorkerService(transport, engine_config(args), name, args.partitions).run(stop_event())
    return 0
