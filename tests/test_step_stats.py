"""The worker's step statistics (services/step_stats.py, PAGESTREAM_STEP_STATS): one log line per window, from
CUDA events around every step (faked here: times in milliseconds on one stream), the model loop's counters and
its host stalls."""
from __future__ import annotations

import gc
import logging
import re

from engine.host_stalls import HostStalls
from engine.step_timing import StepTimer
from services.step_stats import PREFIX, StepStats


class FakeEvent:
    def __init__(self, ms: float, done: bool = True):
        self.ms, self.done = ms, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, other: "FakeEvent") -> float:
        return other.ms - self.ms


class FakeRunner:
    def __init__(self, on_gpu: bool):
        self.on_gpu, self.step_timers = on_gpu, None

    def measure_gpu_time(self, on: bool = True) -> None:
        self.step_timers = [] if on and self.on_gpu else None


def test_a_window_counts_steps_gpu_idle_plans_and_waits(caplog):
    runner = FakeRunner(on_gpu=True)
    stats = StepStats(runner, every_s=0.0)
    # decode 0-7 ms, idle 1 ms, eager 8-28 ms (opening a plan), idle 2 ms, decode 30-37 ms; a step still running
    # is left for later
    runner.step_timers += [StepTimer(FakeEvent(0), FakeEvent(7), False, 0.0, False),
                           StepTimer(FakeEvent(8), FakeEvent(28), True, 0.0, True),
                           StepTimer(FakeEvent(30), FakeEvent(37), False, 0.0, False),
                           StepTimer(FakeEvent(37), FakeEvent(44, False), False, 0.0, False)]
    stats.plan_ran(8, 8)
    stats.plan_ran(8, 3)
    stats.plan_ran(8, 0)
    stats.plan_ran(1, 1)
    stats.waited(0.002, gpu_busy=False, got_plan=True)
    stats.waited(0.1, gpu_busy=False, got_plan=False)          # no work: not a wait for a late plan
    stats.waited(0.001, gpu_busy=True, got_plan=True)
    stats.flushed()
    with caplog.at_level(logging.INFO, logger="pagestream.worker"):
        stats.tick()
    line = caplog.messages[-1]
    assert line.startswith(PREFIX)
    assert "2 decode steps 7.00 ms each, GPU idle before them 2.0 ms" in line
    assert "1 eager steps 20.00 ms each, GPU idle before them 1.0 ms" in line
    assert "GPU idle before plans' first steps 1.0 ms (1.00 each)" in line
    assert "4 plans (1 cut, 1 skipped)" in line
    assert "with the GPU idle 1x 2.0 ms, with a step on it 1x 1.0 ms; 1 steps processed" in line
    assert len(runner.step_timers) == 1                        # the unfinished step waits for the next window
    runner.step_timers[0].end.done = True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pagestream.worker"):
        stats.tick()
    assert "1 decode steps 7.00 ms each, GPU idle before them 0.0 ms" in caplog.messages[-1]


def test_no_line_for_an_idle_window_and_no_gpu_timing_on_the_cpu(caplog):
    stats = StepStats(FakeRunner(on_gpu=False), every_s=0.0)
    with caplog.at_level(logging.INFO, logger="pagestream.worker"):
        stats.tick()
        assert not caplog.messages
        stats.plan_ran(8, 8)
        stats.tick()
    assert "no GPU timing" in caplog.messages[-1] and "1 plans (0 cut, 0 skipped)" in caplog.messages[-1]


def test_a_window_counts_the_collectors_passes_of_that_window_only(caplog):
    gc.disable()                                   # only the passes asked for here
    try:
        with HostStalls() as stalls, caplog.at_level(logging.INFO, logger="pagestream.worker"):
            stats = StepStats(FakeRunner(on_gpu=False), every_s=0.0, stalls=stalls)
            gc.collect()
            gc.collect()
            stats.plan_ran(8, 8)
            stats.tick()
            assert re.search(r"garbage collector 2 passes \d+\.\d ms, 0 kernels compiled$", caplog.messages[-1])
            gc.collect()
            stats.tick()                           # an idle window: no line, and its pass is not the next one's
            stats.plan_ran(8, 8)
            stats.tick()
            assert caplog.messages[-1].endswith("garbage collector 0 passes 0.0 ms, 0 kernels compiled")
    finally:
        gc.enable()
