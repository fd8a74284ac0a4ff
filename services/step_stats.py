"""Where the worker's model loop spends its time, logged every few seconds while it works (a diagnostic, off by
default: PAGESTREAM_STEP_STATS=<seconds between lines>).

Each line covers one window of wall time: how busy the GPU was (CUDA events around every step, as the offline
benchmark's GPU-busy figure), the steps by kind with their mean GPU time and the GPU idle before them (from the
previous step's end to their start), the plans run (cut at a step boundary, or skipped whole), and the model
loop's waits: for a plan while the GPU had nothing left (the scheduler or Redis was late: the GPU idles), and
for a plan while the last step still ran (harmless: the plan comes before the GPU needs it, or the step is
processed when the GPU is done); and the model loop's host stalls (the garbage collector's passes, kernels
compiled: engine/host_stalls.py).

    PAGESTREAM_STEP_STATS=2 pagestream serve ...     # lines "step stats: ..." in the worker's log
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from engine.step_timing import StepTally, tally

if TYPE_CHECKING:                   # an annotation only: PREFIX is read by the benchmarks, which need no torch
    from engine.host_stalls import HostStalls

log = logging.getLogger("pagestream.worker")

ENV = "PAGESTREAM_STEP_STATS"
PREFIX = "step stats:"


class StepStats:
    def __init__(self, runner, every_s: float, stalls: HostStalls | None = None):
        self.runner, self.every_s = runner, every_s
        self.stalls = stalls                       # the model loop's host stalls (engine/host_stalls.py), if counted
        self._stalls_before = self._stall_totals()
        runner.measure_gpu_time()
        self.on_gpu = runner.step_timers is not None
        self._prev_end = None                      # the last counted step's end event
        self._reset(time.perf_counter())

    @classmethod
    def from_env(cls, runner, stalls: HostStalls | None = None) -> "StepStats | None":
        value = os.environ.get(ENV)
        return cls(runner, float(value), stalls) if value else None

    def _stall_totals(self) -> tuple[int, float, int]:
        """(collector passes, their seconds, kernels compiled) so far."""
        s = self.stalls
        return (sum(s.gc_passes), sum(s.gc_seconds), len(s.compiled)) if s is not None else (0, 0.0, 0)

    def _reset(self, now: float) -> None:
        self.window_start = now
        self.plans = self.cut = self.skipped = self.flushes = 0
        self.waits_idle = self.waits_busy = 0
        self.wait_idle_s = self.wait_busy_s = 0.0

    def plan_ran(self, num_steps: int, steps_run: int) -> None:
        self.plans += 1
        self.skipped += steps_run == 0
        self.cut += 0 < steps_run < num_steps

    def waited(self, seconds: float, gpu_busy: bool, got_plan: bool) -> None:
        """A wait of the model loop for the inbox; only those a plan ended count (not idle time with no work)."""
        if not got_plan:
            return
        if gpu_busy:
            self.waits_busy += 1
            self.wait_busy_s += seconds
        else:
            self.waits_idle += 1
            self.wait_idle_s += seconds

    def flushed(self) -> None:
        self.flushes += 1

    def tick(self) -> None:
        now = time.perf_counter()
        if now - self.window_start < self.every_s:
            return
        steps = StepTally()
        if self.on_gpu:
            timers = self.runner.step_timers
            done = 0
            while done < len(timers) and timers[done].end.query():
                done += 1
            steps, self._prev_end = tally(timers[:done], self._prev_end)
            del timers[:done]
        if self.plans or steps.eager.steps or steps.decode.steps:
            wall = now - self.window_start
            parts = [f"{wall:.1f} s", f"GPU busy {steps.gpu_s / wall:.1%}" if self.on_gpu else "no GPU timing"]
            for name, kind in (("decode", steps.decode), ("eager", steps.eager)):
                if kind.steps:
                    parts.append(f"{kind.steps} {name} steps {1000 * kind.gpu_s / kind.steps:.2f} ms each, GPU idle "
                                 f"before them {1000 * kind.idle_before_s:.1f} ms "
                                 f"({1000 * kind.idle_before_s / kind.steps:.2f} each)")
            if steps.plans:
                parts.append(f"GPU idle before plans' first steps {1000 * steps.idle_before_plans_s:.1f} ms "
                             f"({1000 * steps.idle_before_plans_s / steps.plans:.2f} each)")
            parts.append(f"{self.plans} plans ({self.cut} cut, {self.skipped} skipped)")
            parts.append(f"waited for a plan with the GPU idle {self.waits_idle}x {1000 * self.wait_idle_s:.1f} ms, "
                         f"with a step on it {self.waits_busy}x {1000 * self.wait_busy_s:.1f} ms; "
                         f"{self.flushes} steps processed with no plan waiting")
            if self.stalls is not None:
                (passes, seconds, compiled), (passes0, seconds0, compiled0) = self._stall_totals(), self._stalls_before
                parts.append(f"garbage collector {passes - passes0} passes {1000 * (seconds - seconds0):.1f} ms, "
                             f"{compiled - compiled0} kernels compiled")
            log.info("%s %s", PREFIX, "; ".join(parts))
        self._stalls_before = self._stall_totals()
        self._reset(now)
