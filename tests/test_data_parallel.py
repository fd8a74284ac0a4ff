"""Data parallel: several workers, one scheduler placing requests on them, requests moved off a worker that dies.

The placement policy on real engine schedulers; `pagestream serve --data-parallel-size 2` with requests sharing a
long prefix (they land on one worker, visible in /metrics); and a kill -9 of one worker under 64 streaming greedy
requests: each completes with exactly its undisturbed text (the offline engine's), each token once."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest

from conftest import start_stack, stop_stack
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.plan import StepResult
from engine.scheduler import Scheduler
from schemas.sampling_params import SamplingParams
from services.placement import OVERLOAD_SLACK, Placement
from services.scheduler import STATS_EVERY_S

MODEL = "smollm2-135m-instruct"
BLOCK = 16


def engine_scheduler(num_blocks: int = 256) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=256, num_scheduler_steps=1),
                     BlockManager(num_blocks, BLOCK),
                     max_model_len=4096, eos_token_ids=frozenset({0}))


def admit_and_run(scheduler: Scheduler) -> None:
    """One plan: the waiting prompts are admitted (their full blocks enter the prefix cache)."""
    plan = scheduler.schedule()
    scheduler.update(StepResult(list(plan.num_scheduled_tokens), [5] * len(plan.num_scheduled_tokens)))


# ---- the placement policy --------------------------------------------------------------------------------------
def test_a_prompt_goes_where_its_prefix_is_cached_or_was_just_sent():
    workers = {"w0": engine_scheduler(), "w1": engine_scheduler()}
    placement = Placement("prefix")
    system = list(range(100, 100 + 20 * BLOCK))              # a long shared prefix
    first = placement.choose(system + [1, 2, 3], workers)
    assert first.reason == "load"                             # nothing cached anywhere: the least loaded
    workers[first.worker].add_request("a", system + [1, 2, 3], SamplingParams(max_tokens=4), seed=0)
    # Not admitted yet (no blocks): the placement remembers where the prefix went.
    second = placement.choose(system + [7, 8], workers)
    assert second == type(second)(first.worker, "prefix")
    admit_and_run(workers[first.worker])
    placement.recent.clear()                                  # now the worker's real prefix cache alone decides
    assert placement.choose(system + [9], workers).worker == first.worker
    # A prompt that shares only a short head (a chat template's) is placed by load, not by that head.
    other = next(w for w in workers if w != first.worker)
    assert placement.choose(system[:BLOCK] + list(range(5000, 5000 + 20 * BLOCK)), workers) == \
        type(first)(other, "load")


def test_an_overloaded_worker_gets_no_more_of_its_prefixes():
    workers = {"w0": engine_scheduler(4096), "w1": engine_scheduler(4096)}
    placement = Placement("prefix")
    system = list(range(100, 100 + 10 * BLOCK))
    for i in range(OVERLOAD_SLACK + 2):
        choice = placement.choose(system + [i], workers)
        workers[choice.worker].add_request(f"r{i}", system + [i], SamplingParams(max_tokens=4), seed=0)
    loads = sorted(len(s.waiting) for s in workers.values())
    assert loads == [1, OVERLOAD_SLACK + 1]          # the first, the slack beyond it, then one to the idle worker


def test_round_robin_alternates_and_a_lost_worker_is_forgotten():
    workers = {"w0": engine_scheduler(), "w1": engine_scheduler()}
    rr = Placement("round-robin")
    assert [rr.choose([1] * 40, workers).worker for _ in range(4)] == ["w0", "w1", "w0", "w1"]
    placement = Placement("prefix")
    prompt = list(range(200, 200 + 4 * BLOCK))
    gone = placement.choose(prompt, workers).worker
    placement.forget(gone)
    assert gone not in placement.recent.values()
    with pytest.raises(ValueError, match="placement policy"):
        Placement("random")


def test_an_adopted_request_continues_with_its_tokens_seed_and_positions():
    """What the scheduler does with a lost worker's request: its sequences wait on another worker's scheduler with
    the prompt and the tokens known so far, are prefilled again in full, and keep their seed and prompt length."""
    old, new = engine_scheduler(), engine_scheduler()
    prompt = list(range(300, 340))
    seq = old.add_request("r", prompt, SamplingParams(max_tokens=10), seed=1234)
    for token in (7, 8, 9):
        plan = old.schedule()
        old.update(StepResult(list(plan.num_scheduled_tokens), [token]))
    assert seq.output_token_ids == [7, 8, 9] and seq.num_computed_tokens == len(prompt) + 2
    new.add_request("other", [1, 2, 3], SamplingParams(max_tokens=10), seed=0)
    [moved] = new.adopt(old.requests["r"])
    plan = new.schedule()
    sent = {n.seq_id: n for n in plan.new}[moved.seq_id]
    assert sent.token_ids == prompt + [7, 8, 9] and sent.num_prompt_tokens == len(prompt)
    assert sent.seed == 1234 and plan.num_scheduled_tokens[moved.seq_id] == len(prompt) + 3
    new.update(StepResult([moved.seq_id], [10]))
    assert moved.output_token_ids == [7, 8, 9, 10]           # max_tokens counts the tokens made before the move
    with pytest.raises(ValueError, match="already in use"):
        new.adopt([moved])


# ---- served, two workers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("dp"), "--data-parallel-size", "2", "--detokenizers", "2",
                    api_key=None, grpc=False)
    yield s
    stop_stack(s)


def placed(stack) -> dict[tuple[str, str], float]:
    return {(dict(labels)["worker"], dict(labels)["reason"]): value
            for (name, labels), value in stack.metrics().items() if name == "pagestream_requests_placed_total"}


def settled_placements(stack) -> dict[tuple[str, str], float]:
    """The placement counts once the scheduler has published everything placed so far (twice a second)."""
    time.sleep(STATS_EVERY_S * 2.5)
    return placed(stack)


def test_requests_sharing_a_long_prefix_land_on_one_worker(stack):
    before = settled_placements(stack)                    # the readiness probes' placements included
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0)
    system = " ".join(f"Rule {i}: answer briefly and politely." for i in range(60))     # ~600 tokens
    for question in ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three.", "What day is it?"]:
        client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": question}],
                                       max_tokens=2, temperature=0)
    after = settled_placements(stack)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    assert sum(delta.values()) == 5, delta
    assert len({worker for worker, _ in delta}) == 1, delta                 # one worker has them all
    assert sum(v for (_, reason), v in delta.items() if reason == "prefix") == 4, delta


def test_killing_a_worker_loses_no_request_and_changes_no_text(stack, offline):
    """kill -9 of one of two workers under 64 streaming greedy requests: each completes with exactly the offline
    engine's text, its chunks in order and each token once (usage counts every token once)."""
    prompts = [f"Write a short story about robot number {i}." for i in range(64)]
    max_tokens = 48
    expected = [(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in offline.chat(
        [[{"role": "user", "content": p}] for p in prompts], SamplingParams(max_tokens=max_tokens, temperature=0))]
    before = stack.metrics()

    async def run() -> list[tuple[str, int, str | None]]:
        client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=300)
        started = [asyncio.Event() for _ in prompts]

        async def one(i: int) -> tuple[str, int, str | None]:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            text, tokens, finish = "", 0, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                    started[i].set()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return text, tokens, finish

        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 300)
        assert sum(not t.done() for t in tasks) > len(tasks) // 2, "the requests must be running when a worker dies"
        assert stack.kill("worker")
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), 600)     # a restarted worker loads beside it
        finally:
            await client.close()

    results = asyncio.run(run())
    for i, got in enumerate(results):
        assert got == expected[i], (i, got, expected[i])
    key = ("pagestream_requests_migrated_total", ())
    deadline = time.monotonic() + 10
    while stack.metrics().get(key, 0.0) == before.get(key, 0.0):         # published twice a second
        assert time.monotonic() < deadline, "no request was on the killed worker: the test proved nothing"
        time.sleep(0.2)


def test_workers_get_their_gpus_in_order(monkeypatch):
    from services.launcher import worker_devices
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert worker_devices(2, 2) == ["4,5", "6,7"] and worker_devices(1, 1) == ["4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,0")                   # one GPU shared by two workers
    assert worker_devices(2, 1) == ["0", "0"] and worker_devices(1, 1) == ["0"]
    with pytest.raises(SystemExit, match="needs 4 GPUs; 2 visible"):
        worker_devices(2, 2)
