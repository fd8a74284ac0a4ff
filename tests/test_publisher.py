"""The worker's publisher process: frames in (as the worker's pipe writer sends them), messages out on a real Redis.

Owners come before a sequence's tokens and go after its last ones; each step becomes one StepTokens message per
detokenizer partition; a plan's event is published and the plan acknowledged together; a plan the worker dropped
as a repeat is only acknowledged; the frames end with the input. Also the process itself, as the worker runs it:
the Redis URL in its environment, fed through its stdin, it ends when the pipe closes."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

from schemas.codec import decode, encode
from schemas.messages import StepEvent, StepTokens
from services.publisher import GROUP, Publisher, read_frames, write_frame
from services.transport import FIELD, REDIS_URL_ENV, Transport, partition_of

PARTITIONS = 4


def frames_for(worker_plan_id: bytes) -> list[list]:
    a, b = "cmpl-a", "cmpl-b"
    event = StepEvent(plan_id=0, seq_ids=[1, 2], token_ids=[[11, 12], [21]], finish_reasons=[None, "stop"],
                      stop_reasons=[None, None], num_steps_run=2)
    return [
        ["owners", [[1, a, 0, 16, partition_of(a, PARTITIONS)], [2, b, 0, 0, partition_of(b, PARTITIONS)]], []],
        ["step", 0, 100.0, [1, 2], [11, 21], [0, 0], [None, "stop"], [None, None], None,
         [[1, [1.0, 2.0, 3.0, 4.0, 5.0]]], []],
        ["owners", [], [2]],                                      # b ended: its owner goes after its last token
        ["step", 1, 100.5, [1, 2], [12, 99], [1, 1], [None, None], [None, None], None, [], []],
        ["event", encode(event), worker_plan_id],
    ]


def tokens_of(transport: Transport) -> dict[str, list[tuple[int, int, int]]]:
    """request id -> [(step, position, token)] from every partition stream."""
    out: dict[str, list] = {}
    for p in range(PARTITIONS):
        for _, fields in transport.redis.xrange(transport.names.tokens(p)):
            msg = decode(StepTokens, fields[FIELD])
            assert all(partition_of(r, PARTITIONS) == p for r in msg.request_ids)
            for rid, pos, tok in zip(msg.request_ids, msg.positions, msg.token_ids):
                out.setdefault(rid, []).append((msg.step, pos, tok))
    return out


def setup(redis_url: str) -> tuple[Transport, bytes]:
    transport = Transport(redis_url, prefix=f"pub-{uuid.uuid4().hex[:6]}")
    plans = transport.names.plan("w0")
    transport.ensure_group(plans, GROUP)
    transport.publish(plans, b"a plan")
    entry = transport.read([plans], GROUP, "worker-test", count=1, block_ms=None)[0]
    return transport, entry.id


def check(transport: Transport) -> None:
    assert tokens_of(transport) == {"cmpl-a": [(0, 0, 11), (1, 1, 12)], "cmpl-b": [(0, 0, 21)]}
    first = [decode(StepTokens, f[FIELD]) for p in range(PARTITIONS)
             for _, f in transport.redis.xrange(transport.names.tokens(p))]
    stamped = [(m.step, m.first_stamps) for m in first if any(m.first_stamps)]
    assert stamped == [(0, [[1.0, 2.0, 3.0, 4.0, 5.0]])]        # only a's first token carries its journey
    events = transport.redis.xrange(transport.names.events("w0"))
    assert [decode(StepEvent, f[FIELD]).num_steps_run for _, f in events] == [2]
    assert transport.redis.xpending(transport.names.plan("w0"), GROUP)["pending"] == 0


def test_publisher_turns_frames_into_messages(redis_url):
    transport, entry_id = setup(redis_url)
    pipe = io.BytesIO()
    for frame in frames_for(entry_id):
        write_frame(pipe, frame)
    pipe.seek(0)
    Publisher(transport, "w0").run(read_frames(pipe))             # returns at the end of its input
    check(transport)


def test_a_repeated_plan_is_only_acknowledged(redis_url):
    transport, entry_id = setup(redis_url)
    pipe = io.BytesIO()
    write_frame(pipe, ["ack", entry_id])
    pipe.seek(0)
    Publisher(transport, "w0").run(read_frames(pipe))
    assert transport.redis.xpending(transport.names.plan("w0"), GROUP)["pending"] == 0
    assert not transport.redis.exists(transport.names.events("w0")) and tokens_of(transport) == {}


def test_publisher_process_ends_with_its_input(redis_url):
    transport, entry_id = setup(redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "services.publisher", "--prefix", transport.names.prefix,
                             "--worker", "w0"], stdin=subprocess.PIPE, env={**os.environ, REDIS_URL_ENV: redis_url})
    for frame in frames_for(entry_id):
        write_frame(proc.stdin, frame)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    check(transport)
