"""engine/async_output.py: the order in which launched steps are committed and reported (on the CPU, where a
step's tokens are on the host at once, so the order is the whole of it)."""
import torch

from engine.async_output import StepOutputs
from engine.plan import StepResult
from engine.sampler import SamplerOutput


def _outputs(asynchronous: bool):
    log = []

    def commit(seq_ids, active, tokens, logprobs):
        log.append(("commit", tokens[0]))
        return StepResult(list(seq_ids), list(tokens), None)

    outputs = StepOutputs(commit, asynchronous)

    def launch(step: int, leave_previous: bool = False):
        out = SamplerOutput(torch.tensor([step]), None, None, None)
        outputs.push([0], None, out, lambda result: log.append(("report", result.token_ids[0])), leave_previous)

    return outputs, launch, log


def test_a_plans_last_launch_leaves_the_step_before_it_for_the_next_plan():
    outputs, launch, log = _outputs(asynchronous=True)
    launch(0)
    launch(1)
    assert log == [("commit", 0), ("report", 0)]              # step n is processed once step n+1 is launched
    launch(2, leave_previous=True)
    outputs.push_done(lambda: log.append(("done",)))
    assert log[2:] == []                                      # the GPU has steps 1 and 2; the host goes on
    outputs.catch_up()                                        # the next plan is built on step 1's tokens...
    assert log[2:] == [("commit", 1)]
    launch(10)                                                # ...and reported once its first step is launched
    assert log[3:] == [("report", 1), ("commit", 2), ("report", 2), ("done",)]
    launch(11)
    assert log[7:] == [("commit", 10), ("report", 10)]


def test_drain_reports_what_was_held_in_order():
    outputs, launch, log = _outputs(asynchronous=True)
    launch(0)
    launch(1, leave_previous=True)
    outputs.push_done(lambda: log.append(("done",)))
    outputs.catch_up()
    assert log == [("commit", 0)]
    outputs.drain()
    assert log[1:] == [("report", 0), ("commit", 1), ("report", 1), ("done",)]
    assert not outputs.pending


def test_synchronous_output_reports_each_step_before_the_next_launch():
    outputs, launch, log = _outputs(asynchronous=False)
    launch(0)
    launch(1, leave_previous=True)
    outputs.push_done(lambda: log.append(("done",)))
    assert log == [("commit", 0), ("report", 0), ("commit", 1), ("report", 1), ("done",)]


def test_a_plan_of_one_step_holds_nothing_back():
    """Its launch lets through the last plan's final step, whose report is due (the runner asks to leave the
    step before only when that step is the same plan's)."""
    outputs, launch, log = _outputs(asynchronous=True)
    launch(0)
    outputs.push_done(lambda: log.append(("done", 0)))
    launch(1)
    outputs.push_done(lambda: log.append(("done", 1)))
    assert log == [("commit", 0), ("report", 0), ("done", 0)]


def test_plans_end_without_a_callback_too():
    """The engine passes no on_done: the next plan's launch takes what the last plan's left pending."""
    outputs, launch, log = _outputs(asynchronous=True)
    launch(0)
    launch(1, leave_previous=True)
    launch(2)                                                 # a plan of one step: the last plan's are due
    assert log == [("commit", 0), ("report", 0), ("commit", 1), ("report", 1)]


def test_holds_any_names_the_sequences_of_the_held_reports():
    outputs, launch, log = _outputs(asynchronous=True)
    launch(0)
    launch(1, leave_previous=True)
    outputs.catch_up()
    assert outputs.holds_any([0]) and not outputs.holds_any([5])
    outputs.report_held()
    assert log == [("commit", 0), ("report", 0)] and not outputs.holds_any([0])


def test_a_held_report_names_only_the_sequences_whose_tokens_it_carries():
    """Rows that sat a step out (finished earlier in the plan) are in the step but not in its report: the next
    plan frees such sequences all the time, and reporting before its launch for them would idle the GPU."""
    def commit(seq_ids, active, tokens, logprobs):
        keep = [i for i in range(len(seq_ids)) if active is None or active[i]]
        return StepResult([seq_ids[i] for i in keep], [tokens[i] for i in keep], None)

    outputs = StepOutputs(commit, asynchronous=True)
    reported = []
    for step, active in enumerate([[True, True], [True, False], [True, False]]):
        out = SamplerOutput(torch.tensor([step, step]), None, None, None)
        outputs.push([7, 8], active, out, lambda result: reported.append(result.seq_ids), leave_previous=step == 2)
    outputs.catch_up()                                        # step 1 committed, its report held
    assert not outputs.holds_any([8]) and outputs.holds_any([7])
    outputs.drain()
    assert reported == [[7, 8], [7], [7]]
