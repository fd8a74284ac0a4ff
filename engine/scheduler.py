"""Continuous batching: which sequences compute how many tokens in the next step.

There are no prefill and decode phases. Each step has one token budget; every running sequence asks for the
tokens it has not computed yet (the rest of its prompt, or the one token it sampled last step), in service order,
then waiting sequences are admitted while the budget, the sequence limit and the KV pool allow. A prompt larger
than the remaining budget is computed in chunks over several steps (chunked prefill). When the pool runs out, the
last sequence in service order is preempted: its blocks are freed and it is recomputed later (its full blocks
usually come back from the prefix cache).

Pure Python and deterministic: no tensors, no model, no clock.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.block_manager import BlockManager, KVCacheStats
from engine.config import SchedulerConfig
from engine.plan import Fork, NewSequence, Plan, RunningSequence, StepResult
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence, SequenceStatus

_GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv: KVCacheStats
    kv_slot_waste: float          # unused slots in allocated blocks / allocated slots


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_ids: set[int] | frozenset[int] = frozenset()):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []           # kept sorted by sort_key
        self.running: list[Sequence] = []           # kept sorted by sort_key: the last one is preempted first
        self.requests: dict[str, list[Sequence]] = {}   # unfinished requests and their sequences
        self._seqs: dict[int, Sequence] = {}
        self._freed: list[int] = []                 # ids the worker must drop at the next plan
        self._next_seq_id = 0
        self._next_arrival = 0
        self.num_preemptions = 0

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                    priority: int = 0) -> Sequence:
        """Queue a request; raises ValueError (and queues nothing) if it can never be served."""
        self.check_request(request_id, prompt_token_ids, params)
        seq = Sequence(seq_id=self._new_seq_id(), request_id=request_id, index=0,
                       token_ids=list(prompt_token_ids), num_prompt_tokens=len(prompt_token_ids), params=params,
                       seed=seed, arrival=self._next_arrival,
                       priority=priority if self.config.policy == "priority" else 0,
                       num_pending_forks=params.n - 1)
        self._next_arrival += 1
        self.requests[request_id] = [seq]
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        return seq

    def check_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, but max_model_len is {self.max_model_len}: "
                             f"at most {self.max_model_len - 1} prompt tokens leave room for one generated token")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        # The most KV this request can hold (every token but the last sampled one). A preempted sequence is
        # recomputed whole, so that must fit the pool, and one step when prompts cannot be chunked.
        final = min(n + params.max_tokens, self.max_model_len) if params.max_tokens else self.max_model_len
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if final - 1 > capacity:
            raise ValueError(f"the request can grow to {final} tokens ({n} prompt + up to {final - n} generated), "
                             f"more than the KV cache's {capacity} slots hold; lower max_tokens")
        if not self.config.enable_chunked_prefill and final - 1 > self.config.max_num_batched_tokens:
            raise ValueError(f"the request can grow to {final} tokens, more than one step of "
                             f"max_num_batched_tokens={self.config.max_num_batched_tokens} recomputes without "
                             f"chunked prefill; lower max_tokens")

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request; its blocks are free at once. Unknown ids are ignored."""
        seqs = [s for s in self.requests.get(request_id, []) if not s.is_finished]
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

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        plan = Plan(freed_seq_ids=self._freed)
        self._freed = []
        budget = self.config.max_num_batched_tokens
        preempted = False
        forking: list[Sequence] = []

        # Running sequences first, in service order; preempt from the back when the pool is short.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, f"running sequence {seq.seq_id} has nothing to compute"
            changed = self.block_manager.allocate(seq, num_new)
            while changed is None:
                victim = self.running[-1]
                self._preempt(victim, plan)
                preempted = True
                if victim is seq:
                    break
                changed = self.block_manager.allocate(seq, num_new)
            if changed is None:
                break
            plan.running.append(RunningSequence(seq.seq_id, changed, seq.block_ids[changed:]))
            self._commit(plan, seq, num_new, forking)
            budget -= num_new
            i += 1

        # Then admit waiting sequences, unless this step had to preempt (the pool is tight).
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            # Count the siblings that running parents will fork when their prompts complete.
            promised = sum(s.num_pending_forks for s in self.running)
            if len(self.running) + promised + 1 + seq.num_pending_forks > self.config.max_num_seqs:
                break
            cached = self.block_manager.find_cached_prefix(seq)
            num_new = seq.num_tokens - len(cached) * self.block_manager.block_size
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.block_manager.admit(seq, cached, num_new):
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            plan.new.append(NewSequence(seq.seq_id, list(seq.token_ids), seq.num_prompt_tokens,
                                        seq.num_computed_tokens, list(seq.block_ids), seq.params, seq.seed))
            self._commit(plan, seq, num_new, forking)
            budget -= num_new

        for parent in forking:
            self._fork(parent, plan)
        plan.block_copies = self.block_manager.take_pending_copies()
        return plan

    def update(self, result: StepResult) -> list[Sequence]:
        """Append the sampled tokens and finish the sequences they stop. Returns the sequences that grew."""
        grown = []
        for seq_id, token in zip(result.seq_ids, result.token_ids):
            seq = self._seqs.get(seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue                          # finished (aborted, stop string) after the plan was made
            seq.token_ids.append(token)
            self._check_stop(seq, token)
            grown.append(seq)
        return grown

    # ---- internals -----------------------------------------------------------------------------------------
    def _commit(self, plan: Plan, seq: Sequence, num_new: int, forking: list[Sequence]) -> None:
        plan.num_scheduled_tokens[seq.seq_id] = num_new
        seq.num_computed_tokens += num_new
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        if seq.num_pending_forks and seq.num_computed_tokens == seq.num_tokens:
            forking.append(seq)

    def _fork(self, parent: Sequence, plan: Plan) -> None:
        siblings = self.requests[parent.request_id]
        for _ in range(parent.num_pending_forks):
            index = len(siblings)
            child = Sequence(seq_id=self._new_seq_id(), request_id=parent.request_id, index=index,
                             token_ids=list(parent.token_ids), num_prompt_tokens=parent.num_prompt_tokens,
                             params=parent.params, seed=(parent.seed + index * _GOLDEN) % 2**63,
                             arrival=parent.arrival, priority=parent.priority, status=SequenceStatus.RUNNING,
                             num_computed_tokens=parent.num_computed_tokens)
            self.block_manager.fork(parent, child)
            siblings.append(child)
            self._seqs[child.seq_id] = child
            bisect.insort(self.running, child, key=lambda s: s.sort_key)
            plan.forks.append(Fork(parent.seq_id, child.seq_id, child.seed))
        parent.num_pending_forks = 0

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        plan.freed_seq_ids.append(seq.seq_id)
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return self.finish(seq, FinishReason.STOP)
            if token in p.stop_token_ids:
                return self.finish(seq, FinishReason.STOP, stop_reason=token)
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            self.finish(seq, FinishReason.LENGTH)

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
                              self.block_manager.stats(), waste)
