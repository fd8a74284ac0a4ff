"""engine/step_timing.py: what the CUDA events around every step add up to (faked events: times in milliseconds on
one stream), and the offline benchmarks' GPU-busy figures built on it (loadtest/throughput.py, gpu_busy)."""
import pytest

from engine.step_timing import StepTimer, tally
from test_step_stats import FakeEvent


def _timers(spans):
    """(start ms, end ms, eager, opens its plan) -> StepTimers launched at their start."""
    return [StepTimer(FakeEvent(a), FakeEvent(b), eager, a / 1000, opens) for a, b, eager, opens in spans]


# A prefill plan (0-20 ms), then two plans of decode steps; the GPU idles 1 ms within the first, 3 ms before the
# second decode plan's first step.
RUN = [(0, 20, True, True), (20, 25, False, True), (26, 31, False, False), (34, 39, False, True), (39, 44, False, False)]


def test_steps_by_kind_and_the_idle_before_plans():
    t, last = tally(_timers(RUN))
    assert (t.eager.steps, t.decode.steps, t.plans) == (1, 4, 3)
    assert t.eager.gpu_s == pytest.approx(0.020) and t.decode.gpu_s == pytest.approx(0.020)
    assert t.decode.idle_before_s == pytest.approx(0.004)        # 1 ms inside a plan, 3 before one
    assert t.idle_before_plans_s == pytest.approx(0.003)         # the first step has no step before it
    assert last.ms == 44


def test_a_window_counts_the_idle_after_the_last_windows_step():
    timers = _timers(RUN)
    first, last = tally(timers[:2])
    second, _ = tally(timers[2:], last)
    assert second.decode.idle_before_s == pytest.approx(0.004) and second.idle_before_plans_s == pytest.approx(0.003)
    assert first.gpu_s + second.gpu_s == pytest.approx(tally(timers)[0].gpu_s)


def test_gpu_busy_of_a_run(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)   # the faked events need no GPU
    from loadtest.throughput import gpu_busy
    busy, busy_decode, split = gpu_busy(_timers(RUN), 0.0, 0.050)
    assert busy == pytest.approx(40 / 50)
    assert busy_decode == pytest.approx(20 / 30)                   # from the first decode step's launch (20 ms)
    assert split == {"eager": {"gpu_s": 0.02, "steps": 1}, "decode": {"gpu_s": 0.02, "steps": 4},
                     "plans": {"count": 3, "gpu_idle_before_s": 0.003}}
