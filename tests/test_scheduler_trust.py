"""The scheduler service against a real redis-server, with this test playing its worker on the wire (the worker's
registration, heartbeat and per-plan events): requests, aborts and events out of range, or an event naming
sequences its plan never scheduled, are dead-lettered with a reason; the request in flight goes on and its
abort frees its blocks. The plans it makes pass the worker's own checks."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from engine.config import SchedulerConfig
from schemas.codec import decode, encode
from schemas.limits import Limits
from schemas.messages import Abort, PlanMessage, Reply, ScheduleRequest, StepEvent, WorkerInfo
from schemas.sampling_params import SamplingParams
from services.runtime import Heartbeat
from services.scheduler import SchedulerService
from services.transport import FIELD, Transport

INFO = WorkerInfo("w0", uuid.uuid4().hex, num_blocks=64, block_size=16, max_model_len=256, vocab_size=512,
                  eos_token_ids=[2])


@pytest.fixture
def scheduler(redis_url):
    transport = Transport(redis_url, prefix=f"test-{uuid.uuid4().hex[:6]}")
    stop = threading.Event()
    Heartbeat(transport, transport.names.alive("worker", "w0"), INFO.epoch, stop).start()
    transport.register_worker(INFO)
    service = SchedulerService(transport, SchedulerConfig(num_scheduler_steps=2), True)
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    yield transport
    stop.set()
    thread.join(timeout=10)


def next_plan(transport: Transport, after: bytes = b"0") -> tuple[bytes, PlanMessage]:
    reply = transport.redis.xread({transport.names.plan("w0"): after}, count=1, block=10_000)
    assert reply, "no plan"
    entry_id, fields = reply[0][1][0]
    return entry_id, decode(PlanMessage, fields[FIELD], Limits.of(INFO))      # as the worker takes it


def dead_reasons(transport: Transport, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while transport.redis.xlen(transport.names.dead_letter) < n:
        assert time.monotonic() < deadline, transport.redis.xrange(transport.names.dead_letter)
        time.sleep(0.05)
    return [d[b"reason"].decode() for _, d in transport.redis.xrange(transport.names.dead_letter)]


def test_bad_inputs_are_dead_lettered_and_the_request_in_flight_goes_on(scheduler):
    t, names = scheduler, scheduler.names
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    t.publish(names.schedule, encode(ScheduleRequest("good", "gw", [5, 6, 7], params, time.time())))
    entry_id, plan = next_plan(t)
    [seq] = plan.new
    assert plan.new_request_ids == ["good"]
    events = names.events("w0")
    t.publish(events, encode(StepEvent(plan.plan_id, [seq.seq_id, 777], [[9], [9]], [None, None], [None, None])))
    t.publish(events, encode(StepEvent(plan.plan_id, [seq.seq_id], [[512]], [None], [None])))
    t.publish(names.schedule, encode(ScheduleRequest("bad", "gw", [5, 512], params, time.time())))
    t.publish(names.abort, encode(Abort("good", index=-1)))
    reasons = dead_reasons(t, 4)
    assert any("sequences [777] are not in plan" in r for r in reasons), reasons
    assert any("step_event.token_ids[0]: ids must be in [0, 512)" in r for r in reasons), reasons
    assert any("schedule.prompt: prompt token ids must be integers in [0, 512), got [512]" in r
               for r in reasons), reasons
    assert any("abort.index" in r for r in reasons), reasons
    [(_, fields)] = t.redis.xrange(names.reply("gw"))                  # the bad request's client hears why
    [item] = decode(Reply, fields[FIELD]).items
    assert item.request_id == "bad" and item.error.message == "prompt token ids must be integers in [0, 512), got [512]"

    # The real event still finds its plan: the request goes on, in the plans after it.
    t.publish(events, encode(StepEvent(plan.plan_id, [seq.seq_id], [[9]], [None], [None], num_steps_run=1)))
    after = entry_id
    while True:
        after, plan = next_plan(t, after)
        if seq.seq_id in plan.scheduled_seq_ids:
            break
    assert plan.new == [] and {r.seq_id for r in plan.running} <= {seq.seq_id}

    def used() -> int:
        return int(float(t.redis.hget(names.scheduler_stats, "kv_blocks_used") or -1))

    deadline = time.monotonic() + 5
    while used() <= 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t.publish(names.abort, encode(Abort("good")))
    while used() != 0:                                                 # an abort still frees its blocks
        assert time.monotonic() < deadline + 5
        time.sleep(0.05)
    assert len(dead_reasons(t, 4)) == 4
