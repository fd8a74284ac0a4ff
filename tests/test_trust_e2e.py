"""Safe to run by strangers: a schema-valid message with out-of-range values, put on any consuming service's
stream while requests are in flight, is dead-lettered with a reason; every service keeps serving (none
restarts), and the greedy texts of the requests in flight are those they have without the bad messages.
A real stack (`pagestream serve`, the default model on the CPU, its own redis-server)."""
from __future__ import annotations

import asyncio
import time

import openai
import pytest
import redis

from conftest import start_stack, stop_stack
from schemas.codec import decode, encode
from schemas.messages import Abort, GenerateRequest, PlanMessage, ScheduleRequest, StepEvent, WorkerInfo
from schemas.plan import Fork, NewSequence, RunningSequence
from schemas.sampling_params import SamplingParams
from services.transport import FIELD, Names

MODEL = "smollm2-135m-instruct"
PROMPTS = [f"Write a short story about the number {i}:" for i in range(4)]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("trust"), api_key=None)
    yield s
    stop_stack(s)


async def greedy_texts(stack, started: asyncio.Event | None = None) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=300)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].text
            if started is not None and len(text) > 0:
                started.set()
        return text

    try:
        return await asyncio.gather(*(one(p) for p in PROMPTS))
    finally:
        await client.close()


def bad_messages(r: redis.Redis, names: Names) -> list[tuple[str, bytes, str]]:
    """(stream, payload, a fragment of the reason it must be dead-lettered for): one per check, each schema-valid."""
    info = decode(WorkerInfo, r.get(names.worker_info("w0")))
    scheduler_epoch = r.get(names.alive("scheduler")).decode()
    vocab, pool = info.vocab_size, info.num_blocks
    params = SamplingParams(temperature=0, max_tokens=4)

    def plan(**fields) -> bytes:
        base = dict(plan_id=10**9, worker_epoch=info.epoch, scheduler_epoch=scheduler_epoch, num_steps=1, new=[],
                    new_request_ids=[], new_indexes=[], running=[], scheduled_seq_ids=[], scheduled_tokens=[],
                    forks=[], fork_indexes=[], block_copies=[], freed_seq_ids=[])
        return encode(PlanMessage(**{**base, **fields}))

    def new(seq_id=10**6, tokens=(1, 2, 3), blocks=(0,)) -> dict:
        seq = NewSequence(seq_id, list(tokens), len(tokens), 0, list(blocks), params, 1)
        return dict(new=[seq], new_request_ids=["intruder"], new_indexes=[0], scheduled_seq_ids=[seq_id],
                    scheduled_tokens=[len(tokens)])

    def schedule(ids, p=params) -> bytes:
        return encode(ScheduleRequest("intruder", "nobody", list(ids), p, time.time()))

    negative = encode(ScheduleRequest("intruder", "nobody", [1, 2], params, time.time()))
    negative = negative.replace(b"\xaamax_tokens\x04", b"\xaamax_tokens\xff")          # max_tokens -1
    plans, schedule_stream, events = names.plan("w0"), names.schedule, names.events("w0")
    return [
        (plans, plan(**new(tokens=(1, 10**9, 3))), "token_ids: ids must be in [0"),
        (plans, plan(**new(blocks=(pool + 5,))), "block_ids: ids must be in [0"),
        (plans, plan(num_steps=0), "num_steps"),
        (plans, plan(**{**new(), "new_indexes": []}), "columns of unequal lengths"),
        (plans, plan(block_copies=[(0, pool)]), "block_copies"),
        (plans, plan(running=[RunningSequence(10**6 + 1, 0, [1])]), "running sequence 1000001 is not held"),
        (plans, plan(scheduled_seq_ids=[10**6 + 2], scheduled_tokens=[1]), "scheduled sequence 1000002 is not"),
        (plans, plan(**new(tokens=range(1, 40), blocks=(0,))), "exceed its 1 blocks"),
        (plans, plan(**new(), forks=[Fork(10**6 + 3, 10**6 + 4, 1)], fork_indexes=[1]), "fork parent"),
        (schedule_stream, schedule([1, vocab]), "schedule.prompt: prompt token ids must be integers in [0"),
        (schedule_stream, schedule([1, 2], SamplingParams(stop_token_ids=[vocab + 7])), "stop_token_ids"),
        (schedule_stream, schedule([1, 2], SamplingParams(max_tokens=10**9)), "max_tokens"),
        (schedule_stream, negative, "max_tokens must be at least 1"),
        (names.abort, encode(Abort("intruder", index=-3)), "abort.index"),
        (events, encode(StepEvent(10**9, [1, 2], [[1]], [None], [None])), "columns of unequal lengths"),
        (events, encode(StepEvent(10**9, [1], [[vocab]], [None], [None])), "token_ids[0]: ids must be in [0"),
        (names.tokenize, encode(GenerateRequest("intruder", "nobody", SamplingParams(stop_token_ids=[vocab]),
                                                time.time(), prompt="hi")), "stop_token_ids"),
        (names.tokenize, encode(GenerateRequest("intruder", "nobody", SamplingParams(n=10**6), time.time(),
                                                prompt="hi")), "params.n"),
    ]


def test_out_of_range_messages_are_dead_lettered_and_requests_in_flight_are_unaffected(stack):
    names = Names(stack.prefix)
    r = redis.Redis.from_url(stack.redis_url)
    reference = asyncio.run(greedy_texts(stack))
    assert all(reference)
    pids = {service: stack.service_pids(service) for service in ("worker", "scheduler", "tokenizer")}
    bad = bad_messages(r, names)

    async def with_intruders():
        started = asyncio.Event()
        run = asyncio.create_task(greedy_texts(stack, started))
        await asyncio.wait_for(started.wait(), 120)
        for stream, payload, _ in bad:
            r.xadd(stream, {FIELD: payload})
        return await asyncio.wait_for(run, 300)

    texts = asyncio.run(with_intruders())
    assert texts == reference
    deadline = time.monotonic() + 30
    while r.xlen(names.dead_letter) < len(bad):
        assert time.monotonic() < deadline, [d[b"reason"] for _, d in r.xrange(names.dead_letter)]
        time.sleep(0.2)
    reasons = [d[b"reason"].decode() for _, d in r.xrange(names.dead_letter)]
    assert len(reasons) == len(bad), reasons
    for stream, _, fragment in bad:
        assert any(fragment in reason for reason in reasons), (stream, fragment, reasons)
    assert {service: stack.service_pids(service) for service in pids} == pids      # nothing restarted
    assert asyncio.run(greedy_texts(stack)) == reference                            # and it keeps serving
