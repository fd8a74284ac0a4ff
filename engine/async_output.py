"""Sampled tokens on their way to the host, and what the host does with them.

On the GPU, each step's sampled ids (and logprobs) are copied to pinned host memory on a side stream, behind an
event. With asynchronous output, the host processes step n's tokens only after it has launched step n+1: the
copy and the bookkeeping (appending tokens, stop checks, publishing) overlap the GPU's next step, which never
waits. This holds across plans too: a plan's last step is processed once the next plan's first step is launched
(see ModelRunner.execute). Without it (the ablation), each step is processed before the next is launched.

A step is processed in two parts: its commit (the runner's own bookkeeping: tokens appended, stops checked), which
building the next plan needs, and its report (on_step: the engine's scheduler update and output processing, or the
worker's publishing), which nothing on the GPU's path needs. At a plan's end the host has more to do before the next
launch (schedule, apply and stage the next plan), so there the GPU is left two steps: the plan's last launch
processes nothing of its plan, the step before it is committed only when the next plan is built (catch_up), and its
report waits for the next launch. Reports then lag by one more step for a moment, in order. (On the Llama-3.2-1B
shape, whose decode step is 2.3 ms, the host's boundary work was 4-5 ms: the GPU idled 2-3 ms before every plan.)

The queue is in launch order and is processed in that order, so every consumer sees a sequence's tokens in order,
and a plan's "done" callback runs right after its last step's tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from engine.plan import StepResult, TokenLogprobs
from engine.sampler import SamplerOutput


@dataclass
class _Pending:
    on_step: Callable[[StepResult], None] | None
    seq_ids: list[int]
    active: list[bool] | None          # rows whose token belongs to their sequence (None: all)
    tokens: torch.Tensor               # host (pinned) once `ready` fires
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    ready: torch.cuda.Event | None


class StepOutputs:
    def __init__(self, commit: Callable[[list[int], list[bool] | None, list[int], list | None], StepResult],
                 asynchronous: bool, copy_stream=None):
        self.commit, self.asynchronous = commit, asynchronous
        self.copy_stream = copy_stream
        self.pending: deque[_Pending | Callable[[], None]] = deque()
        self._newest: _Pending | None = None       # the last step pushed
        # Reports (and callbacks behind them) due at the next launch, with the sequences each names.
        self._held: deque[tuple[Callable[[], None], list[int]]] = deque()
        self.results: list[StepResult] = []       # processed since the last take_results()

    def push(self, seq_ids: list[int], active: list[bool] | None, out: SamplerOutput,
             on_step: Callable[[StepResult], None] | None, leave_previous: bool = False) -> None:
        """A step has been launched (its sampled ids may not exist yet): start their way to the host.
        leave_previous: it ends its plan and the step before it is the plan's too, so that one stays pending as
        well (for catch_up): the GPU has two steps while the host makes the next plan."""
        n = len(seq_ids)
        lp = None if out.logprobs is None else (out.logprobs[:n], out.top_token_ids[:n], out.top_logprobs[:n])
        if self.copy_stream is None:                    # CPU: already on the host
            self.pending.append(_Pending(on_step, seq_ids, active, out.token_ids[:n], lp, None))
        else:
            compute = torch.cuda.current_stream()
            self.copy_stream.wait_stream(compute)
            with torch.cuda.stream(self.copy_stream):
                tokens = _to_host(out.token_ids[:n])
                lp = None if lp is None else tuple(_to_host(t) for t in lp)
                ready = torch.cuda.Event()
                ready.record()
            self.pending.append(_Pending(on_step, seq_ids, active, tokens, lp, ready))
        self._newest = self.pending[-1]
        self.report_held()                              # due at this launch
        # Asynchronous: process the steps before this one (this one is queued behind them on the GPU).
        self._settle((2 if leave_previous else 1) if self.asynchronous else 0)

    def to_host(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Device tensors on their way to host memory, behind the step being computed: they may be read once a
        step pushed after this call has been processed (its copy is queued behind theirs)."""
        if self.copy_stream is None:
            return tensors
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            return [_to_host(t) for t in tensors]

    def push_done(self, callback: Callable[[], None]) -> None:
        """Run callback once every step pushed so far has been processed (a plan's end: asynchronous, the plan
        leaves at most two steps pending, so only a callback already leading runs now)."""
        self.pending.append(callback)
        self._settle(2 if self.asynchronous else 0)

    def newest_tokens(self) -> torch.Tensor:
        """The sampled ids of the last step pushed, on the host. Waits for that step's copy only, not for what
        was launched on the GPU after it (structured output reads them while the next step's forward runs)."""
        if self._newest.ready is not None:
            self._newest.ready.synchronize()
        return self._newest.tokens

    def drain(self) -> None:
        self.report_held()
        self._settle(0)

    def catch_up(self) -> None:
        """Commit every step but the last launched (what the next plan is built and checked against); their
        reports wait for the next launch."""
        self._settle(1 if self.asynchronous else 0, hold=True)

    def holds_any(self, seq_ids: list[int]) -> bool:
        """Whether a held report carries a token of one of seq_ids (they must be reported before the runner
        forgets them, and that is done before the next launch, with the GPU waiting)."""
        return bool(self._held) and not set(seq_ids).isdisjoint(s for _, named in self._held for s in named)

    def report_held(self) -> None:
        while self._held:
            self._held.popleft()[0]()

    def on_host(self) -> bool:
        """Whether every pending step's tokens have reached the host: processing them would not wait."""
        return all(p.ready is None or p.ready.query() for p in self.pending if isinstance(p, _Pending))

    def _settle(self, keep: int, hold: bool = False) -> None:
        """Process from the front until at most `keep` steps wait (callbacks run as soon as they lead)."""
        while self.pending and (not isinstance(self.pending[0], _Pending)
                                or sum(isinstance(p, _Pending) for p in self.pending) > keep):
            self._process(self.pending.popleft(), hold)

    def take_results(self) -> list[StepResult]:
        results, self.results = self.results, []
        return results

    def _process(self, p: "_Pending | Callable[[], None]", hold: bool) -> None:
        """Commit a step now; report it now too, unless reports are held (then behind them, in order)."""
        if not isinstance(p, _Pending):      # a plan's "done": the last plan's (its own steps are still pending)
            self._report(p, [], False)
            return
        if p.ready is not None:
            p.ready.synchronize()
        logprobs = None
        if p.logprobs is not None:
            sampled, top_ids, top_lps = (t.tolist() for t in p.logprobs)
            logprobs = [TokenLogprobs(lp, list(zip(ids, lps))) for lp, ids, lps in zip(sampled, top_ids, top_lps)]
        result = self.commit(p.seq_ids, p.active, p.tokens.tolist(), logprobs)
        self.results.append(result)
        if p.on_step is not None:
            # It names the sequences whose tokens it carries: not the rows that sat the step out (finished
            # earlier in the plan), which the next plan frees all the time (see holds_any).
            self._report(lambda: p.on_step(result), result.seq_ids, hold)

    def _report(self, report: Callable[[], None], seq_ids: list[int], hold: bool) -> None:
        if hold or self._held:
            self._held.append((report, seq_ids))
        else:
            report()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    t.record_stream(torch.cuda.current_stream())     # keep the device tensor alive until the copy ran
    return host
