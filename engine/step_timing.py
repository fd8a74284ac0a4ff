"""CUDA events around every step (ModelRunner.measure_gpu_time), and what they add up to: each kind of step's GPU
time and the GPU idle before it, and the idle before the first step of each plan.

The idle before a plan's first step is the plan boundary's: the host committing the last plan's steps, scheduling,
applying and staging the next one while the GPU runs out of queued steps. On the Llama-3.2-1B shape, whose decode
step is 2.3 ms, it is most of what keeps the GPU from being busy. The offline benchmarks read the timers of a
whole run (loadtest/throughput.py, gpu_busy), the served worker's step statistics window by window
(services/step_stats.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class StepTimer(NamedTuple):
    start: Any             # torch.cuda.Event recorded before the step's first kernel
    end: Any               # and after its last
    eager: bool            # a prefill or mixed step (else a decode step)
    launched: float        # the host's time.perf_counter() at its launch
    opens_plan: bool       # the first step its plan launched


@dataclass
class KindTally:
    steps: int = 0
    gpu_s: float = 0.0
    idle_before_s: float = 0.0     # GPU idle between the step before and these steps' starts


@dataclass
class StepTally:
    decode: KindTally = field(default_factory=KindTally)
    eager: KindTally = field(default_factory=KindTally)
    plans: int = 0                 # steps that opened a plan
    idle_before_plans_s: float = 0.0

    @property
    def gpu_s(self) -> float:
        return self.decode.gpu_s + self.eager.gpu_s


def tally(timers: list[StepTimer], prev_end: Any = None) -> tuple[StepTally, Any]:
    """Add up finished steps' timers (in launch order). prev_end: the end event of the step before the first, if
    it was counted earlier (the idle before the first is then counted too). Returns the tally and the last end."""
    t = StepTally()
    for timer in timers:
        kind = t.eager if timer.eager else t.decode
        kind.steps += 1
        kind.gpu_s += timer.start.elapsed_time(timer.end) / 1000
        idle = max(0.0, prev_end.elapsed_time(timer.start) / 1000) if prev_end is not None else 0.0
        kind.idle_before_s += idle
        if timer.opens_plan:
            t.plans += 1
            t.idle_before_plans_s += idle
        prev_end = timer.end
    return t, prev_end
