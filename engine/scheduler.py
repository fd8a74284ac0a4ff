"""Continuous batching: which sequences compute how many tokens in the next step.

There are no prefill and decode phases. Each step has one token budget; every running sequence asks for the
tokens it has not computed yet (the rest of its prompt, or the one token it sampled last step), in service order,
then waiting sequences are admitted while the budget, the sequence limit and the KV pool allow. In a burst (more
prompt tokens waiting to start than one step takes), with prefill_first, the decodes come after the prompts and
take what they leave: each decode row would displace a prompt token and wait a whole prefill step for its token.
A prompt larger than the remaining budget is computed in chunks over several steps (chunked prefill). When the
pool runs out, the last sequence in service order is preempted: its blocks are freed and it is recomputed later
(its full blocks usually come back from the prefix cache).

A beam search request is a group of sequences, its beams (engine/beam_search.py): each computes one token per plan
and proposes candidates, and once all have, update() ranks them, continues, forks and frees beams, and hands the
plan the beams' new tokens (BeamStep). A group keeps a seat for each of its beam_width beams while any runs.

Pure Python and deterministic: no tensors, no model, no clock.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

from engine.beam_search import BeamGroup, BeamSearchResult, Continuation
from engine.block_manager import BlockManager, KVCacheStats
from engine.config import SchedulerConfig
from engine.plan import Plan, StepResult
from engine.sequence import FinishReason, Sequence, SequenceStatus, check_stop
from schemas.beam_search_params import BeamSearchParams, check_beam_search
from schemas.plan import BeamStep, Fork, NewSequence, RunningSequence
from schemas.sampling_params import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15
AHEAD = -(1 << 63)              # the priority of a request queued `ahead`: below any a client can send (int64)


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv: KVCacheStats
    kv_slot_waste: float          # unused slots in allocated blocks / allocated slots
    beam_kv_blocks_saved: int = 0  # KV blocks the running beam searches' beams share now (independent: held more)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_ids: set[int] | frozenset[int] = frozenset()):
        if config.max_num_batched_tokens is None:
            raise ValueError("the scheduler needs a step budget: SchedulerConfig.for_device fills in the defaults")
        self.config = config
        # The most prompt tokens one sequence computes in a step (only prompts are chunked: unchunked, a prompt
        # takes the budget or waits).
        self.prompt_chunk = (config.long_prefill_token_threshold or config.max_num_batched_tokens) \
            if config.enable_chunked_prefill else config.max_num_batched_tokens
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []           # kept sorted by sort_key
        self.running: list[Sequence] = []           # kept sorted by sort_key: the last one is preempted first
        self.requests: dict[str, list[Sequence]] = {}   # unfinished requests and their sequences
        self._seqs: dict[int, Sequence] = {}
        self._freed: list[int] = []                 # ids the worker must drop at the next plan
        self.beam_groups: dict[str, BeamGroup] = {}     # the unfinished beam search requests
        self._beam_steps: list[BeamStep] = []       # beams chosen since the last plan
        self.finished_beam_searches: list[BeamSearchResult] = []   # for the engine or the service to take
        self._next_seq_id = 0
        self._next_arrival = 0
        self.num_preemptions = 0

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                    priority: int = 0, beam_search: BeamSearchParams | None = None, ahead: bool = False) -> Sequence:
        """Queue a request (a beam search with beam_search: params.n is how many of its beams it returns);
        raises ValueError (and queues nothing) if it can never be served. One `ahead` is admitted before every
        waiting request whatever the policy: a readiness probe, whose answer must say whether the pipeline
        works, not how long its queue is."""
        self.check_request(request_id, prompt_token_ids, params, beam_search)
        forks, returned = params.num_sequences - 1, params.n
        if beam_search is not None:
            # Its beams ask the sampler for their candidates: the top 2 x beam_width logprobs.
            params, forks = replace(params, n=1, best_of=None, logprobs=beam_search.num_candidates), 0
        seq = Sequence(seq_id=self._new_seq_id(), request_id=request_id, index=0,
                       token_ids=list(prompt_token_ids), num_prompt_tokens=len(prompt_token_ids), params=params,
                       seed=seed, arrival=self._next_arrival,
                       priority=AHEAD if ahead else priority if self.config.policy == "priority" else 0,
                       num_pending_forks=forks)
        self._next_arrival += 1
        self.requests[request_id] = [seq]
        if beam_search is not None:
            group = self.beam_groups[request_id] = BeamGroup(beam_search, returned, self.eos_token_ids,
                                                                  self.max_model_len)
            group.beams, group.cum_logprobs = [seq], {seq.seq_id: 0.0}
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        return seq

    def adopt(self, seqs: list[Sequence]) -> list[Sequence]:
        """Continue here a request whose worker is gone: its unfinished sequences, taken from that worker's
        scheduler, wait with the tokens known so far and are recomputed when admitted, as after a preemption. Each
        keeps its seed, index and prompt length, so its output positions and its sampler stream go on where they
        were: greedy and seeded sampling continue exactly as undisturbed. (A beam search is not adopted: its beams'
        tokens were never streamed, so it starts again with add_request.)"""
        seqs = [s for s in seqs if not s.is_finished]
        if not seqs:
            return []
        request_id = seqs[0].request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        moved = [replace(s, seq_id=self._new_seq_id(), arrival=self._next_arrival, token_ids=list(s.token_ids),
                         status=SequenceStatus.WAITING, num_inflight=0, num_computed_tokens=0, num_cached_tokens=0,
                         block_ids=[], block_hashes=[]) for s in seqs]
        self._next_arrival += 1
        self.requests[request_id] = moved
        for seq in moved:
            self._seqs[seq.seq_id] = seq
            bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        return moved

    def check_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      beam_search: BeamSearchParams | None = None) -> None:
        """What only the scheduler knows. The prompt itself (not empty, in the vocabulary, within max_model_len
        with its max_tokens) was checked by the InputProcessor before it got here."""
        n = len(prompt_token_ids)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.num_sequences > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} (best_of={params.num_sequences}) exceeds "
                             f"max_num_seqs={self.config.max_num_seqs}" if params.best_of else
                             f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if beam_search is not None:
            check_beam_search(params, beam_search)
            if beam_search.beam_width > self.config.max_num_seqs:
                raise ValueError(f"beam_width={beam_search.beam_width} exceeds max_num_seqs="
                                 f"{self.config.max_num_seqs}")
        # The most KV this request can hold (every token but the last sampled one). A preempted sequence is
        # recomputed whole, so that must fit the pool, and one step when prompts cannot be chunked.
        final = min(n + params.max_tokens, self.max_model_len) if params.max_tokens else self.max_model_len
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if final - 1 > capacity:
            raise ValueError(f"the request can grow to {final} tokens ({n} prompt + up to {final - n} generated), "
                             f"more than the KV cache's {capacity} slots hold; lower max_tokens")
        # A beam waiting for its siblings' candidates holds its blocks: all the beams, unshared, must fit at
        # once, or a preempted one could wait forever for room.
        if beam_search is not None:
            blocks = beam_search.beam_width * -(-(final - 1) // self.block_manager.block_size)
            if blocks > self.block_manager.num_blocks:
                raise ValueError(f"beam search of width {beam_search.beam_width} can hold {blocks} KV blocks (each "
                                 f"beam up to {final} tokens), more than the KV cache's "
                                 f"{self.block_manager.num_blocks}; lower max_tokens or the beam width")
        if not self.config.enable_chunked_prefill and final - 1 > self.config.max_num_batched_tokens:
            raise ValueError(f"the request can grow to {final} tokens, more than one step of "
                             f"max_num_batched_tokens={self.config.max_num_batched_tokens} recomputes without "
                             f"chunked prefill; lower max_tokens")

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request; its blocks are free at once. Unknown ids are ignored."""
        seqs = [s for s in self.requests.get(request_id, []) if not s.is_finished]
        self.beam_groups.pop(request_id, None)
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, reason, stop_reason
        seq.num_pending_forks = 0          # a parent that ends before its prompt is complete never forks
        self._freed.append(seq.seq_id)
        del self._seqs[seq.seq_id]
        siblings = self.requests[seq.request_id]
        if all(s.is_finished for s in siblings):
            del self.requests[seq.request_id]

    def get_sequence(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one plan ------------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """The next plan. It may be made before the results of the previous ones are back (the worker is a plan
        behind): their tokens count as in flight, and a sequence whose last token is in flight waits for it."""
        # Forking copies the parent's state after the step that completes its prompt, so such plans are one step.
        # So are plans with prompt tokens to compute: decode steps never hold a prompt back (a prompt that
        # arrives during a plan of k steps is taken at its next step boundary: see cut()).
        forks_due = any(s.num_pending_forks for s in self.running) or any(s.num_pending_forks for s in self.waiting)
        steps = 1 if forks_due or self.has_prompt_work() else self.config.num_scheduler_steps
        plan = Plan(freed_seq_ids=self._freed)
        self._freed = []
        budget = self.config.max_num_batched_tokens       # bounds step 1; later steps compute one token each
        forking: list[Sequence] = []
        # Running sequences first, in service order; then waiting ones, unless this plan had to preempt. In a
        # burst, with prefill_first, the decodes come last: they take what the prompts leave of the budget.
        pause_decodes = self.config.prefill_first and steps == 1 and self._burst_waiting(budget)
        budget, preempted = self._schedule_running(plan, budget, steps, forking, prompts_only=pause_decodes)
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if seq.num_inflight:                          # preempted while its tokens were in flight: wait
                break
            if not self._has_seats_for(seq):
                break
            # prompt_logprobs need every prompt position's logits: a prompt that wants them is computed whole,
            # none of it taken from the prefix cache (vLLM recomputes too)
            wants_prompt_logprobs = seq.params.prompt_logprobs is not None and not seq.num_output_tokens
            cached = [] if wants_prompt_logprobs else self.block_manager.find_cached_prefix(seq)
            uncomputed = seq.num_tokens - len(cached) * self.block_manager.block_size
            if uncomputed > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(uncomputed, budget, self.prompt_chunk)
            beam = seq.request_id in self.beam_groups
            extra = min(steps - 1, self._tokens_left(seq) - 1) if num_new == uncomputed and not beam else 0
            if not self.block_manager.admit(seq, cached, num_new + extra):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            plan.new.append(NewSequence(seq.seq_id, list(seq.token_ids), seq.num_prompt_tokens,
                                        seq.num_computed_tokens, list(seq.block_ids), seq.params, seq.seed, beam))
            self._commit(plan, seq, num_new, extra, uncomputed, forking)
            budget -= num_new

        if pause_decodes:       # preempting only for a plan with nothing else in it: none was admitted for it
            self._schedule_running(plan, budget, steps, forking, may_preempt=not plan.num_scheduled_tokens)
        for parent in forking:
            self._fork(parent, plan)
        plan.block_copies = self.block_manager.take_pending_copies()
        plan.beam_steps, self._beam_steps = self._beam_steps, []
        for group in self.beam_groups.values():
            group.observe_blocks()
        return plan

    def _schedule_running(self, plan: Plan, budget: int, steps: int, forking: list[Sequence],
                          prompts_only: bool = False, may_preempt: bool = True) -> tuple[int, bool]:
        """Give the running sequences not in plan yet their tokens of it, in service order (prompts_only: only
        those still computing their prompt), preempting from the back when the pool is short (or, unless
        may_preempt, stopping there). Returns the budget left and whether it preempted."""
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            left = self._tokens_left(seq)
            group = self.beam_groups.get(seq.request_id) if self.beam_groups else None
            uncomputed = seq.num_tokens + seq.num_inflight - seq.num_computed_tokens
            # left <= 0: its last token is in flight, it ends when that lands; a waiting beam: it is chosen
            if left <= 0 or (group is not None and group.waits(seq)) or (prompts_only and uncomputed == 1) \
                    or seq.seq_id in plan.num_scheduled_tokens:
                i += 1
                continue
            num_new = min(uncomputed, budget, self.prompt_chunk)
            extra = min(steps - 1, left - 1) if num_new == uncomputed and group is None else 0
            changed = self.block_manager.allocate(seq, num_new + extra)
            if changed is None and not may_preempt:
                break
            while changed is None:
                victim = self.running[-1]
                self._preempt(victim, plan)
                preempted = True
                if victim is seq:
                    break
                changed = self.block_manager.allocate(seq, num_new + extra)
            if changed is None:
                break
            plan.running.append(RunningSequence(seq.seq_id, changed, seq.block_ids[changed:]))
            self._commit(plan, seq, num_new, extra, uncomputed, forking)
            budget -= num_new
            i += 1
        return budget, preempted

    def _burst_waiting(self, budget: int) -> bool:
        """Whether more prompt tokens wait to start than budget, counting the prompts that free seats could
        take (a cheap count: it ignores prefix-cache hits), and the waiting head fits in the free KV blocks (so a
        plan that pauses the decodes starts a prompt). Prompts already started do not count: one long prompt,
        chunked, pauses the decodes for one step, not for its whole prefill."""
        if not self.has_prompt_work():
            return False
        backlog = 0
        for seq in self.waiting[:max(0, self.config.max_num_seqs - len(self.running))]:
            backlog += seq.num_tokens
            if backlog > budget:
                return True
        return False

    def has_prompt_work(self) -> bool:
        """Whether the next step would compute prompt tokens: a running prompt not computed yet, or a waiting
        sequence that could be admitted now (a cheap check: it ignores prefix-cache hits)."""
        if any(s.num_tokens + s.num_inflight - s.num_computed_tokens > 1 for s in self.running):
            return True
        if not self.waiting or self.waiting[0].num_inflight:
            return False
        head = self.waiting[0]
        return self._has_seats_for(head) and \
            self.block_manager.num_free_blocks * self.block_manager.block_size >= head.num_tokens

    def _has_seats_for(self, seq: Sequence) -> bool:
        """Whether admitting seq (and the siblings it will fork) keeps the running sequences within
        max_num_seqs, counting the siblings that running parents will fork when their prompts complete, and the
        beams that running beam searches may grow to (a search keeps beam_width seats while any beam runs)."""
        promised = sum(s.num_pending_forks for s in self.running)
        need = 1 + seq.num_pending_forks
        for rid, group in self.beam_groups.items():
            running = sum(b.status is SequenceStatus.RUNNING for b in group.beams)
            if running:
                promised += group.params.beam_width - running
            if rid == seq.request_id:
                need = 0 if running else group.params.beam_width
        return len(self.running) + promised + need <= self.config.max_num_seqs

    def cut(self, plan: Plan, steps_run: int) -> None:
        """The worker ran only the first steps_run steps of plan (it stops a plan at a step boundary when a
        plan with new prompts is waiting). The steps it skipped neither computed nor sampled anything: take
        them back. Their blocks stay with the sequence, which grows into them later."""
        for seq_id, n in plan.samples.items():
            missing = n - min(n, steps_run)
            seq = self._seqs.get(seq_id)
            if missing and seq is not None:
                seq.num_inflight = max(0, seq.num_inflight - missing)
                if seq.status is SequenceStatus.RUNNING:
                    seq.num_computed_tokens -= missing

    def update(self, result: StepResult) -> list[Sequence]:
        """One step's sampled tokens: append them and finish the sequences they stop. Returns the sequences
        that grew. Tokens of sequences finished meanwhile (aborted, stop string) are dropped."""
        grown = []
        proposed: dict[str, BeamGroup] = {}
        for i, (seq_id, token) in enumerate(zip(result.seq_ids, result.token_ids)):
            seq = self._seqs.get(seq_id)
            if seq is None:
                continue
            seq.num_inflight = max(0, seq.num_inflight - 1)
            group = self.beam_groups.get(seq.request_id) if self.beam_groups else None
            if group is not None:
                # A beam's sampled token means nothing: its candidates do. A preempted beam proposes again once
                # it is back (its KV is gone; its candidates would be the same).
                if seq.status is SequenceStatus.RUNNING:
                    if result.logprobs is None or result.logprobs[i] is None:
                        raise ValueError(f"beam {seq_id} sampled without its candidates")
                    group.candidates[seq_id] = result.logprobs[i].top
                    proposed[seq.request_id] = group
                continue
            seq.token_ids.append(token)
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))
            stop = check_stop(seq.params, token, seq.num_output_tokens, seq.num_tokens, self.eos_token_ids,
                              self.max_model_len)
            if stop is not None:
                self.finish(seq, *stop)
            grown.append(seq)
        for request_id, group in proposed.items():
            if group.ready():
                self._next_beams(request_id, group)
        return grown

    def take_finished_beam_searches(self) -> list[BeamSearchResult]:
        results, self.finished_beam_searches = self.finished_beam_searches, []
        return results

    # ---- internals -----------------------------------------------------------------------------------------
    def _tokens_left(self, seq: Sequence) -> int:
        """Tokens seq may still generate beyond those known and in flight (it cannot know about EOS yet)."""
        produced = seq.num_tokens + seq.num_inflight
        left = self.max_model_len - produced
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - (produced - seq.num_prompt_tokens))
        return left

    def _commit(self, plan: Plan, seq: Sequence, num_new: int, extra: int, uncomputed: int,
                forking: list[Sequence]) -> None:
        plan.num_scheduled_tokens[seq.seq_id] = num_new + extra
        plan.num_steps = max(plan.num_steps, 1 + extra)
        seq.num_computed_tokens += num_new + extra
        if num_new == uncomputed:                         # reaches its last token: samples in every step it runs
            seq.num_inflight += 1 + extra
            plan.samples[seq.seq_id] = 1 + extra
            if seq.num_pending_forks:
                forking.append(seq)
        self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))

    def _fork(self, parent: Sequence, plan: Plan) -> None:
        siblings = self.requests[parent.request_id]
        for _ in range(parent.num_pending_forks):
            index = len(siblings)
            child = Sequence(seq_id=self._new_seq_id(), request_id=parent.request_id, index=index,
                             token_ids=list(parent.token_ids), num_prompt_tokens=parent.num_prompt_tokens,
                             params=parent.params, seed=(parent.seed + index * _GOLDEN) % 2**63,
                             arrival=parent.arrival, priority=parent.priority, status=SequenceStatus.RUNNING,
                             num_computed_tokens=parent.num_computed_tokens, num_inflight=1)
            self.block_manager.fork(parent, child)
            siblings.append(child)
            self._seqs[child.seq_id] = child
            bisect.insort(self.running, child, key=lambda s: s.sort_key)
            plan.forks.append(Fork(parent.seq_id, child.seq_id, child.seed))
            plan.samples[child.seq_id] = 1
        parent.num_pending_forks = 0

    def _next_beams(self, request_id: str, group: BeamGroup) -> None:
        """Every live beam has proposed: rank, then continue, fork and free beams; or end the search."""
        kept = group.rank()
        parents = group.beams
        if not kept or kept[0].reaches_length:
            self.beam_groups.pop(request_id)
            self.finished_beam_searches.append(group.result(request_id, kept))
            for seq in parents:
                self.finish(seq, FinishReason.LENGTH)
            return
        continued: dict[int, Continuation] = {}     # parent -> its best continuation, taken in place
        beams = []
        # Forks first: a new beam copies its parent's tokens before the parent's own next token is appended.
        for c in kept:
            if c.parent.seq_id not in continued:
                continued[c.parent.seq_id] = c
                beams.append(c.parent)
                continue
            child = Sequence(seq_id=self._new_seq_id(), request_id=request_id, index=0,
                             token_ids=c.parent.token_ids + [c.token_id], num_prompt_tokens=c.parent.num_prompt_tokens,
                             params=c.parent.params, seed=c.parent.seed, arrival=c.parent.arrival,
                             priority=c.parent.priority, status=SequenceStatus.RUNNING,
                             num_computed_tokens=c.parent.num_computed_tokens)
            self.block_manager.fork(c.parent, child)
            self._seqs[child.seq_id] = child
            bisect.insort(self.running, child, key=lambda s: s.sort_key)
            self._beam_steps.append(BeamStep(child.seq_id, c.parent.seq_id, c.token_id))
            group.cum_logprobs[child.seq_id] = c.cum_logprob
            beams.append(child)
        for seq_id, c in continued.items():
            c.parent.token_ids.append(c.token_id)
            self._beam_steps.append(BeamStep(seq_id, seq_id, c.token_id))
            group.cum_logprobs[seq_id] = c.cum_logprob
        group.beams = beams                         # in the order of their continuations: best first
        self.requests[request_id] = self.requests[request_id] + [b for b in beams if b not in parents]
        for seq in parents:
            if seq.seq_id not in continued:
                del group.cum_logprobs[seq.seq_id]
                self.finish(seq, FinishReason.ABORT)
        self.requests[request_id] = list(group.beams)

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        """Free its blocks; it is recomputed from its tokens when admitted again (once its in-flight ones land)."""
        group = self.beam_groups.get(seq.request_id) if self.beam_groups else None
        if group is not None:
            group.candidates.pop(seq.seq_id, None)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        plan.freed_seq_ids.append(seq.seq_id)
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id - 1

    # ---- metrics -------------------------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        bs = self.block_manager.block_size
        fill: dict[int, int] = {}          # block -> slots holding a computed token (shared blocks count once)
        for seq in self.running:
            for i, block in enumerate(seq.block_ids):
                fill[block] = max(fill.get(block, 0), min(bs, max(0, seq.num_computed_tokens - i * bs)))
        allocated = len(fill) * bs
        waste = 1.0 - sum(fill.values()) / allocated if allocated else 0.0
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions,
                              self.block_manager.stats(), waste,
                              sum(g.kv_blocks_saved for g in self.beam_groups.values()))
