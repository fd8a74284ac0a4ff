"""Value ranges beyond the schema (schemas/limits.py): well-formed messages pass; out-of-range ones fail with a
SchemaError naming the field; and no payload at all, random or a mutated real message, makes decode and validate
raise anything but SchemaError (hypothesis)."""
from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import SchemaError, decode, encode
from schemas.limits import Limits
from schemas.messages import Abort, GenerateRequest, PlanMessage, ScheduleRequest, StepEvent, StepTokens, WorkerInfo
from schemas.plan import NewSequence, RunningSequence
from schemas.sampling_params import SamplingParams
from test_schemas import MESSAGES, PARAMS

LIMITS = Limits(vocab_size=512, max_model_len=2048, num_blocks=100, block_size=16)
PLAN = next(m for m in MESSAGES if isinstance(m, PlanMessage))


def with_changes(msg, **changes) -> bytes:
    body = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("msg", MESSAGES, ids=[type(m).__name__ for m in MESSAGES])
def test_well_formed_messages_are_in_range(msg):
    if hasattr(msg, "validate"):
        assert decode(type(msg), encode(msg), LIMITS) == msg


def new_seq(**changes) -> dict:
    seq = dict(seq_id=0, token_ids=[1, 2, 3], num_prompt_tokens=3, num_computed_tokens=0, block_ids=[5],
               params={}, seed=1)
    return {**seq, **changes}


OUT_OF_RANGE = [
    ("plan token id 10^9", PlanMessage, with_changes(PLAN, new=[new_seq(token_ids=[1, 10**9])]),
     "plan.new[0].token_ids: ids must be in [0, 512), got [1000000000]"),
    ("plan block beyond the pool", PlanMessage, with_changes(PLAN, new=[new_seq(block_ids=[100])]),
     "plan.new[0].block_ids: ids must be in [0, 100)"),
    ("plan negative seq id", PlanMessage, with_changes(PLAN, new=[new_seq(seq_id=-1)]), "plan.new[0].seq_id"),
    ("plan nothing computed to sample", PlanMessage, with_changes(PLAN, new=[new_seq(num_computed_tokens=3)]),
     "num_computed_tokens"),
    ("plan longer than max_model_len", PlanMessage, with_changes(PLAN, new=[new_seq(token_ids=[1] * 2049)]),
     "token_ids length"),
    ("plan zero steps", PlanMessage, with_changes(PLAN, num_steps=0), "plan.num_steps"),
    ("plan of a million steps", PlanMessage, with_changes(PLAN, num_steps=10**6), "plan.num_steps"),
    ("plan unequal columns", PlanMessage, with_changes(PLAN, new_request_ids=[]), "columns of unequal lengths"),
    ("plan running block", PlanMessage, with_changes(PLAN, running=[{"seq_id": 1, "block_offset": 0,
                                                                     "new_block_ids": [-1]}]), "new_block_ids"),
    ("plan block table too long", PlanMessage,
     with_changes(PLAN, running=[{"seq_id": 1, "block_offset": 128, "new_block_ids": [1]}]), "blocks"),
    ("plan zero scheduled tokens", PlanMessage, with_changes(PLAN, scheduled_tokens=[3, 0]), "scheduled_tokens"),
    ("plan twice scheduled", PlanMessage, with_changes(PLAN, scheduled_seq_ids=[1, 1]), "appears twice"),
    ("plan self fork", PlanMessage, with_changes(PLAN, forks=[{"parent_id": 0, "child_id": 0, "seed": 1}]),
     "cannot fork itself"),
    ("plan copy beyond the pool", PlanMessage, with_changes(PLAN, block_copies=[[5, 10**9]]), "block_copies"),
    ("plan infinite temperature", PlanMessage,
     with_changes(PLAN, new=[new_seq(params={"temperature": math.inf})]), "temperature: must be finite"),
    # (A request's prompt and lengths are the input processor's to check: tests/test_input_processor.py.)
    ("request stop token beyond vocab", ScheduleRequest,
     encode(ScheduleRequest("r", "gw", [1], SamplingParams(stop_token_ids=[600]), 1.0)), "stop_token_ids"),
    ("request huge n", ScheduleRequest, encode(ScheduleRequest("r", "gw", [1], SamplingParams(n=10**7), 1.0)),
     "params.n"),
    ("generate stop token beyond vocab", GenerateRequest,
     encode(GenerateRequest("r", "gw", SamplingParams(stop_token_ids=[512]), 1.0, prompt="hi")), "stop_token_ids"),
    ("abort negative index", Abort, encode(Abort("r", index=-1)), "abort.index"),
    ("abort unknown reason", Abort, encode(Abort("r", reason="because")), "abort.reason"),
    ("event unequal columns", StepEvent, encode(StepEvent(1, [0, 1], [[5]], [None], [None])), "unequal"),
    ("event token beyond vocab", StepEvent, encode(StepEvent(1, [0], [[5, 9999]], [None], [None])), "token_ids[0]"),
    ("event unknown finish", StepEvent, encode(StepEvent(1, [0], [[5]], ["bored"], [None])), "finish reason"),
    ("tokens negative position", StepTokens,
     encode(StepTokens(0, ["r"], [0], [-1], [5], [None], [None])), "positions"),
    ("worker info eos beyond vocab", WorkerInfo, encode(WorkerInfo("w", "e", 10, 16, 2048, 512, [512])), "eos"),
]


@pytest.mark.parametrize("name,cls,data,fragment", OUT_OF_RANGE, ids=[b[0] for b in OUT_OF_RANGE])
def test_out_of_range_values_fail_clearly(name, cls, data, fragment):
    decode(cls, data)                                  # schema-valid: only the ranges are wrong
    with pytest.raises(SchemaError) as failure:
        decode(cls, data, LIMITS)
    assert fragment in str(failure.value)


def test_a_client_asking_too_many_tokens_is_left_to_the_input_processor():
    """Its message (the model's maximum context length) is the one OpenAI clients know."""
    request = GenerateRequest("r", "gw", SamplingParams(max_tokens=10**6), 1.0, prompt="hi")
    assert decode(GenerateRequest, encode(request), LIMITS) == request


def test_validate_checks_objects_built_in_process_too():
    seq = NewSequence(0, [1, 2], 2, 0, [3], PARAMS, 1)
    seq.validate("new", LIMITS)
    with pytest.raises(SchemaError, match="new.block_ids"):
        NewSequence(0, [1, 2], 2, 0, [300], PARAMS, 1).validate("new", LIMITS)
    with pytest.raises(SchemaError, match="run.block_offset"):
        RunningSequence(0, -1, []).validate("run", LIMITS)


# ---- fuzzing ---------------------------------------------------------------------------------------------------
CLASSES = sorted({type(m) for m in MESSAGES}, key=lambda c: c.__name__)
INTS = st.one_of(st.integers(-2, 3), st.integers(-(1 << 63), (1 << 64) - 1), st.sampled_from([511, 512, 2048, 100]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_schema_error(cls, data: bytes) -> None:
    try:
        decode(cls, data, LIMITS)
    except SchemaError:
        pass


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes_only_ever_raise_schema_error(cls, data):
    decode_or_schema_error(cls, data)


def paths(value, prefix=()):
    """Every place inside a decoded message: a map's key or a list's index, at any depth."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


@pytest.mark.parametrize("msg", MESSAGES, ids=[f"{type(m).__name__}{i}" for i, m in enumerate(MESSAGES)])
@FUZZ
@given(data=st.data())
def test_mutated_messages_only_ever_raise_schema_error(msg, data):
    """A real message with one value anywhere in it replaced (or removed, or a field added)."""
    body = msgpack.unpackb(encode(msg), raw=False, strict_map_key=False)
    where = data.draw(st.sampled_from([p for p in paths(body) if p]))
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    if action == "replace":
        parent[where[-1]] = data.draw(VALUES)
    elif action == "delete":
        del parent[where[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(VALUES)
    else:
        parent.append(data.draw(VALUES))
    decode_or_schema_error(type(msg), msgpack.packb(body, use_bin_type=True))
