"""The engine's greedy tokens equal Hugging Face transformers' greedy generate, token for token: for every
supported architecture, and under every scheduling path (preemption, prefix caching, chunked prefill, batching,
forking)."""
from __future__ import annotations

import pytest

from conftest import ARCHITECTURES, hf_greedy, random_prompts
from engine import LLM, SamplingParams

NEW_TOKENS = 32


def greedy(max_tokens: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llama_reference(tiny_model_dir):
    """8 prompts of different lengths (5..150 tokens) and transformers' greedy continuations."""
    path = tiny_model_dir("llama")
    prompts = random_prompts(8, 5, 150, seed=1)
    return path, prompts, hf_greedy(path, prompts, NEW_TOKENS)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_match_transformers(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = random_prompts(8, 3, 120, seed=2)
    llm = LLM(str(path), progress=False)
    assert tokens(llm.generate(prompts, greedy())) == hf_greedy(path, prompts, NEW_TOKENS)


@pytest.mark.parametrize("steps", [1, 8])
def test_preemption_keeps_greedy_outputs(llama_reference, steps):
    path, prompts, expected = llama_reference
    # 16 blocks of 16 slots cannot hold 8 sequences of up to 182 tokens: the scheduler must preempt, with
    # single steps and with multi-step plans (where a preempted sequence's last token is still in flight).
    llm = LLM(str(path), progress=False, num_blocks=16, block_size=16, num_scheduler_steps=steps)
    assert tokens(llm.generate(prompts, greedy())) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_caching_keeps_greedy_outputs(tiny_model_dir):
    path = tiny_model_dir("llama")
    shared = random_prompts(1, 70, 70, seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(6, 1, 40, seed=4)]
    expected = hf_greedy(path, prompts, NEW_TOKENS)
    llm = LLM(str(path), progress=False, block_size=8)
    assert tokens(llm.generate(prompts[:1], greedy())) == expected[:1]      # fills the cache
    outputs = llm.generate(prompts[1:], greedy())
    assert tokens(outputs) == expected[1:]
    assert all(o.num_cached_tokens >= 64 for o in outputs)                  # 8 full blocks of the shared prefix
    assert llm.engine.stats().kv.prefix_hit_rate > 0.3


def test_chunked_prefill_keeps_greedy_outputs(llama_reference):
    path, prompts, expected = llama_reference
    llm = LLM(str(path), progress=False, max_num_batched_tokens=16)
    assert tokens(llm.generate(prompts, greedy())) == expected


def test_batch_of_one_equals_batch_of_32(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    prompts = random_prompts(32, 2, 60, seed=5)
    llm = LLM(str(path), progress=False)
    batched = tokens(llm.generate(prompts, greedy(16)))
    alone = [tokens(llm.generate([p], greedy(16)))[0] for p in prompts]
    assert batched == alone
    assert batched[:4] == hf_greedy(path, prompts[:4], 16)


def test_forked_sequences_share_the_prompt_and_continue_correctly(llama_reference):
    """n=3 greedy: every fork must reproduce the single greedy continuation, which checks that children share
    the prompt's blocks and copy the partial one before writing (block size 16, prompts not multiples of 16)."""
    path, prompts, expected = llama_reference
    llm = LLM(str(path), progress=False)
    outputs = llm.generate(prompts[:4], greedy(n=3))
    for out, ref in zip(outputs, expected):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == ref for c in out.outputs)
    assert llm.engine.stats().kv.num_used_blocks == 0                       # every fork released its blocks


def test_seeded_forks_differ_and_reproduce(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompt = random_prompts(1, 20, 20, seed=6)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    first = LLM(str(path), progress=False).generate([prompt], params)[0]
    again = LLM(str(path), progress=False).generate([prompt], params)[0]
    runs = [c.token_ids for c in first.outputs]
    assert runs == [c.token_ids for c in again.outputs]
    assert len({tuple(r) for r in runs}) == 3


def test_multi_step_plans_keep_greedy_outputs(llama_reference):
    """k = 4 decode steps per plan; 30 tokens is not a multiple of 4, so sequences end inside a plan."""
    path, prompts, expected = llama_reference
    llm = LLM(str(path), progress=False, num_scheduler_steps=4)
    assert tokens(llm.generate(prompts, greedy(30))) == [e[:30] for e in expected]


def test_decode_rows_go_longest_context_first(llama_reference):
    """Every decode plan's rows are ordered by context, longest first (the attention kernel schedules its
    programs in row order: kernels/attention.py), and the tokens are still transformers' (prompts of 5..150
    tokens, chunked, so the rows arrive in an order of their own)."""
    path, prompts, expected = llama_reference
    llm = LLM(str(path), progress=False, num_scheduler_steps=4, max_num_batched_tokens=64)
    batch = llm.engine.runner.decode_batch
    loads = []
    load = batch.load

    def watched(seq_ids, positions, *args):
        loads.append(list(positions))
        return load(seq_ids, positions, *args)
    batch.load = watched
    assert tokens(llm.generate(prompts, greedy())) == expected
    assert sum(len(p) > 1 for p in loads) >= 8
    assert all(p == sorted(p, reverse=True) for p in loads)


@pytest.mark.parametrize("steps", [4, 8])
def test_plans_cut_at_step_boundaries_keep_greedy_outputs(llama_reference, steps):
    """Plans of k steps cut short at random step boundaries (as when a new prompt arrives mid-plan), with
    preemption forced and prompts chunked: the same tokens, and every block back in the pool at the end."""
    import random
    path, prompts, expected = llama_reference
    engine = LLM(str(path), progress=False, num_scheduler_steps=steps, num_blocks=16, block_size=16,
                 max_num_batched_tokens=64).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy())
    coin = random.Random(5)
    out, cuts = {}, []

    def should_stop() -> bool:                      # asked only between steps: each True cuts a plan
        cuts.append(coin.random() < 0.3)
        return cuts[-1]

    while engine.has_unfinished_requests():
        for o in engine.step(stream=False, should_stop=should_stop):
            out[o.request_id] = o.outputs[0].token_ids
    assert [out[f"r{i}"] for i in range(len(prompts))] == expected
    assert sum(cuts) > 5 and engine.scheduler.num_preemptions > 0
    assert engine.stats().kv.num_used_blocks == 0


def test_prompt_work_makes_single_step_plans(llama_reference):
    """While prompts are waiting or chunked, plans are one step: decode steps never hold a prompt back."""
    path, prompts, _ = llama_reference
    engine = LLM(str(path), progress=False, num_scheduler_steps=8, max_num_batched_tokens=64).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy())
    plans = []
    while engine.has_unfinished_requests():
        prompt_work = engine.scheduler.has_prompt_work() or bool(engine.scheduler.waiting)
        engine.step(stream=False)
        plans.append((prompt_work, engine.runner.steps_run))
    assert all(steps == 1 for work, steps in plans if work)
    assert any(steps == 8 for work, steps in plans if not work)


def run_one_plan_ahead(engine, requests) -> dict[str, list[int]]:
    """Drive scheduler and runner as the pipeline does: plan r+1 is made before plan r's tokens come back."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out: dict[str, list[int]] = {}
    in_flight: list = []
    while engine.scheduler.has_unfinished() or in_flight:
        plan = engine.scheduler.schedule()
        results = engine.runner.execute(plan)
        for result in in_flight:
            for seq in engine.scheduler.update(result):
                out[seq.request_id] = seq.output_token_ids
        in_flight = results
    return out


@pytest.mark.parametrize("steps", [1, 3])
def test_scheduler_one_plan_ahead_keeps_outputs_and_stops(llama_reference, steps):
    """The scheduler learns each plan's tokens a plan late. Stop tokens and max_tokens land mid-plan: the worker
    masks what follows, the scheduler ends the sequence at the same token, nothing extra leaks."""
    path, prompts, expected = llama_reference
    engine = LLM(str(path), progress=False, num_scheduler_steps=steps, max_num_batched_tokens=64).engine
    stop_token = expected[0][9]                           # sequence 0 must stop at its 10th token
    requests = {f"r{i}": (p, greedy(23 + i, stop_token_ids=[stop_token])) for i, p in enumerate(prompts)}
    out = run_one_plan_ahead(engine, requests)
    for i, ref in enumerate(expected):
        want = ref[:23 + i]
        if stop_token in want:
            want = want[:want.index(stop_token) + 1]
        assert out[f"r{i}"] == want
    assert engine.stats().kv.num_used_blocks == 0


def run_plans_ahead(engine, arrivals: dict[int, list[str]], prompts, params, should_stop, ahead: int = 2):
    """Drive scheduler and runner as the services do: the scheduler keeps `ahead` plans outstanding (made before
    the tokens of those ahead of them are back) and learns each plan's tokens and steps run from its "event",
    which the runner hands over once the plan's last step is on the host. The runner may end any plan at a step
    boundary and skip a plan of decode steps (may_skip), as the worker does when prompts wait behind it.
    arrivals: loop iteration -> request ids added then. Returns the tokens per request and the plans skipped."""
    from collections import deque
    sched, runner = engine.scheduler, engine.runner
    out, events, queue = {}, [], deque()
    unanswered, skipped, i = 0, 0, 0
    while sched.has_unfinished() or queue or unanswered or any(k >= i for k in arrivals):
        for rid in arrivals.get(i, []):
            engine.add_request(rid, prompts[int(rid[1:])], params)
        i += 1
        for plan, steps, results in events:
            sched.cut(plan, steps)
            for result in results:
                for seq in sched.update(result):
                    out[seq.request_id] = list(seq.output_token_ids)
        unanswered -= len(events)
        events.clear()
        while unanswered < ahead:
            plan = sched.schedule()
            if plan.is_empty and not plan.freed_seq_ids:
                break
            queue.append(plan)
            unanswered += not plan.is_empty              # a plan that only frees gets no event
        if not queue:
            runner.flush()
            continue
        plan, results = queue.popleft(), []
        done = None if plan.is_empty else (lambda steps, plan=plan, res=results: events.append((plan, steps, res)))
        runner.execute(plan, results.append, done, should_stop=should_stop, may_skip=True)
        skipped += bool(plan.num_scheduled_tokens) and runner.steps_run == 0
    return out, skipped


@pytest.mark.parametrize("steps", [4, 8])
def test_plans_ahead_cut_and_skipped_keep_greedy_outputs(llama_reference, steps):
    """Two plans outstanding, as between the scheduler and worker services, with prompts arriving while others
    decode, plans cut at random step boundaries and plans of decode steps skipped whole (the worker does so when a
    plan that admits prompts waits behind one), preemption forced and prompts chunked: the same tokens, and every
    block back in the pool at the end."""
    import random
    path, prompts, expected = llama_reference
    engine = LLM(str(path), progress=False, num_scheduler_steps=steps, num_blocks=16, block_size=16,
                 max_num_batched_tokens=64).engine
    coin = random.Random(3)
    arrivals = {0: ["r0", "r1", "r2"], 3: ["r3"], 5: ["r4", "r5"], 9: ["r6"], 14: ["r7"]}
    out, skipped = run_plans_ahead(engine, arrivals, prompts, greedy(), lambda: coin.random() < 0.3)
    assert [out[f"r{i}"] for i in range(len(prompts))] == expected
    assert skipped > 3 and engine.scheduler.num_preemptions > 0
    assert engine.stats().kv.num_used_blocks == 0


def test_plans_that_free_finished_sequences_launch_before_the_last_plans_reports(llama_reference):
    """LLMEngine's loop, as LLM.generate runs it: a plan frees the sequences that finished inside the plan before
    it, whose rows sat that plan's last steps out. The held reports of those steps carry no token of theirs, so
    they go out after the plan's first launch, as any report does, not before it with the GPU idle (on the
    Llama-3.2-1B shape that was 0.4-0.9 ms at most plan boundaries). Greedy tokens unchanged."""
    path, prompts, expected = llama_reference
    engine = LLM(str(path), progress=False, num_scheduler_steps=4).engine
    runner = engine.runner
    plans = []                                      # per execute(): frees sequences, reports before / after launch
    execute, push = runner.execute, runner.outputs.push

    def execute_watched(plan, on_step=None, *args, **kwargs):
        state = {"frees": bool(plan.freed_seq_ids), "launched": False, "before": 0, "after": 0}
        plans.append(state)

        def report(result):                         # counted for the plan running now (it may be a later one)
            now = plans[-1]
            now["after" if now["launched"] else "before"] += 1
            on_step(result)
        return execute(plan, report if on_step else None, *args, **kwargs)

    def push_watched(*args, **kwargs):
        plans[-1]["launched"] = True                # push comes right after a step's launch
        return push(*args, **kwargs)

    runner.execute, runner.outputs.push = execute_watched, push_watched
    lengths = [3 + 2 * i for i in range(len(prompts))]    # finishing at different steps of different plans
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(f"r{i}", prompt, greedy(n))
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step(stream=False):
            out[o.request_id] = o.outputs[0].token_ids
    assert [out[f"r{i}"] for i in range(len(prompts))] == [e[:n] for e, n in zip(expected, lengths)]
    freeing = [p for p in plans if p["frees"] and p["launched"]]
    assert len(freeing) >= 3 and all(p["after"] > 0 for p in freeing)
    assert all(p["before"] == 0 for p in plans if p["launched"])


@pytest.mark.parametrize("asynchronous", [True, False])
def test_prompts_arriving_mid_decode_keep_seeded_penalized_samples(llama_reference, asynchronous):
    """A mixed step (a new prompt beside running decodes) is built while the GPU still samples the decodes'
    input tokens, which it then takes from the device. Seeded sampling with penalties depends on every token
    and on the token count: a request's tokens are the same alone and with prompts arriving during its decode,
    in multi-step plans, with asynchronous output on and off."""
    path, prompts, _ = llama_reference
    params = SamplingParams(temperature=1.0, seed=7, presence_penalty=0.8, repetition_penalty=1.3, max_tokens=24,
                            ignore_eos=True)

    def engine():
        e = LLM(str(path), progress=False, num_scheduler_steps=4, async_output=asynchronous).engine
        calls = []
        forward = e.runner._forward_prefill
        e.runner._forward_prefill = lambda chunks, from_device=None: (calls.append(from_device),
                                                                      forward(chunks, from_device))[1]
        return e, calls

    alone, _ = engine()
    alone.add_request("a", prompts[0], params)
    while alone.has_unfinished_requests():
        done = {o.request_id: o for o in alone.step(stream=False)}
        expected = done["a"].outputs[0].token_ids if "a" in done else None

    busy, calls = engine()
    busy.add_request("a", prompts[0], params)
    out, step = {}, 0
    while busy.has_unfinished_requests():
        if step in (2, 4, 7):                       # while "a" decodes
            busy.add_request(f"late{step}", prompts[step % len(prompts)], greedy(6))
        for o in busy.step(stream=False):
            out[o.request_id] = o.outputs[0].token_ids
        step += 1
    assert out["a"] == expected and len(expected) == 24
    took_from_device = [c for c in calls if c is not None]
    assert bool(took_from_device) == asynchronous    # synchronous output has every token on the host already
