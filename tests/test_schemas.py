"""Every wire message round-trips; anything else fails with a clear SchemaError that names the problem."""
from __future__ import annotations

import msgpack
import pytest

from schemas.codec import SchemaError, decode, encode
from schemas.codec import _Declined, _from_wire, _reader     # the compiled readers, held to the full one
from schemas.messages import (Abort, ChatMessage, ErrorInfo, GenerateRequest, PlanMessage, Reply, ReplyItem,
                              RequestMeta, Resume, ScheduleRequest, StepEvent, StepTokens, TokenLogprobsWire, WorkerInfo)
from schemas.plan import Fork, NewSequence, RunningSequence
from schemas.sampling_params import SamplingParams

PARAMS = SamplingParams(n=2, temperature=0.7, top_k=5, stop=["\n"], stop_token_ids=[7], logprobs=3, seed=11)

MESSAGES = [
    GenerateRequest(request_id="r1", gateway="gw", params=PARAMS, arrival=1.5, prompt="hi"),
    GenerateRequest(request_id="r2", gateway="gw", params=SamplingParams(), arrival=2.0,
                    messages=[ChatMessage("user", "hello")], priority=3, epoch="e"),
    ScheduleRequest(request_id="r1", gateway="gw", prompt_token_ids=[1, 2, 3], params=PARAMS, arrival=1.0),
    RequestMeta(request_id="r1", gateway="gw", num_prompt_tokens=3, prompt_tail=[2, 3], params=PARAMS),
    Abort("r1"), Abort("r1", index=1, reason="stop", stop_reason="END"), Resume("r1", "gw2"),
    PlanMessage(plan_id=4, worker_epoch="w", scheduler_epoch="s", num_steps=8,
                new=[NewSequence(0, [1, 2, 3], 3, 0, [5], PARAMS, 99)], new_request_ids=["r1"], new_indexes=[0],
                running=[RunningSequence(1, 2, [9, 10])], scheduled_seq_ids=[0, 1], scheduled_tokens=[3, 1],
                forks=[Fork(0, 2, 7)], fork_indexes=[1], block_copies=[(5, 6)], freed_seq_ids=[3]),
    StepEvent(plan_id=4, seq_ids=[0, 1], token_ids=[[5, 6], [7]], finish_reasons=[None, "stop"],
              stop_reasons=[None, 7]),
    StepTokens(step=9, request_ids=["r1"], indexes=[0], positions=[4], token_ids=[42], finish_reasons=["length"],
               stop_reasons=[None], logprobs=[TokenLogprobsWire(-0.5, [42, 3], [-0.5, -1.5])], num_cached_tokens=[16]),
    Reply([ReplyItem(request_id="r1", index=1, seq=2, text="é", token_ids=[5], finish_reason="stop", stop_reason="\n"),
           ReplyItem(request_id="r2", error=ErrorInfo("too long", code=400))]),
    WorkerInfo("w0", "e", 100, 16, 2048, 512, [2]),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=[type(m).__name__ for m in MESSAGES])
def test_round_trip(msg):
    assert decode(type(msg), encode(msg)) == msg


def mutate(msg, **changes) -> bytes:
    body = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


BAD = [
    ("not msgpack", b"\xc1\xc1", "not valid msgpack"),
    ("not a map", msgpack.packb([1, 2]), "expected a map"),
    ("other type", encode(Abort("r")), "expected a 'generate' message"),
    ("newer version", mutate(MESSAGES[0], v=2), "version 2, this build speaks 1"),
    ("missing field", msgpack.packb({"t": "abort", "v": 1}), "missing field 'request_id'"),
    ("wrong field type", mutate(MESSAGES[0], arrival="soon"), "arrival: expected a number"),
    ("bool is not int", mutate(MESSAGES[0], priority=True), "priority: expected an integer"),
    ("unknown field", mutate(MESSAGES[0], surprise=1), "unknown field"),
    ("oversized string", mutate(MESSAGES[0], request_id="x" * 300), "exceed the limit of 256"),
    ("invalid params", mutate(MESSAGES[0], params={"temperature": -1.0}), "temperature must be >= 0"),
    ("wrong nested type", mutate(MESSAGES[0], messages=[{"role": 1, "content": "x"}]), "role: expected str"),
]


@pytest.mark.parametrize("name,data,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_messages_fail_clearly(name, data, fragment):
    cls = Abort if name == "missing field" else GenerateRequest
    with pytest.raises(SchemaError, match=None) as failure:
        decode(cls, data)
    assert fragment in str(failure.value)


def wire_body(msg) -> dict:
    body = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    del body["t"], body["v"]
    return body


@pytest.mark.parametrize("msg", MESSAGES, ids=[type(m).__name__ for m in MESSAGES])
def test_every_message_takes_the_compiled_reader(msg):
    """The messages the services exchange are read by their compiled reader, not the full checker (it declines
    nothing of them), and it reads them as the full checker does."""
    body = wire_body(msg)
    assert _reader(type(msg))(body) == _from_wire(body, type(msg), "m") == msg


ODD_VALUES = [True, False, 0, -3, 1.5, "s", "x" * 300, "", None, b"b", [], [1], [1, 2.5], ["a"], [True], [None],
              [[1, 2]], [1.5], {}, {"a": 1}, {1: 2.5}, {"text": "x"}]


def test_the_compiled_reader_never_takes_what_the_full_checker_refuses():
    """Every field of every message, and every field of the messages nested in them, set to values of the wrong
    type or size: where the compiled reader takes a body, the full checker takes it too and reads the same;
    everywhere else the compiled reader declines (and decode says what the full checker says)."""
    def variants(body: dict):
        for name, value in body.items():
            for odd in ODD_VALUES:
                yield {**body, name: odd}
            if isinstance(value, dict):
                for inner in variants(value):
                    yield {**body, name: inner}
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for inner in variants(value[0]):
                    yield {**body, name: [inner] + value[1:]}
    taken = declined = 0
    for msg in MESSAGES:
        cls = type(msg)
        for body in variants(wire_body(msg)):
            try:
                full = _from_wire(body, cls, "m")
            except SchemaError:
                full = SchemaError
            try:
                fast = _reader(cls)(body)
            except _Declined:
                declined += 1
                continue
            taken += 1
            assert full is not SchemaError and fast == full, (cls.__name__, body)
    assert taken > 100 and declined > 1000


def test_schemas_depend_on_nothing_of_the_engine():
    """The wire contract stands alone: a service that only speaks messages does not load the engine."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, schemas.messages, schemas.plan, schemas.sampling_params; "
            "print(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"
