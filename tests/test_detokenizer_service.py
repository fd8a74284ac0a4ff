"""The detokenizer service on a real Redis, and on a Redis Cluster. The entries one read brings from a partition go
out in one transaction (replies, checkpoints, acknowledgements); a replica that takes the partition over resumes
each completion from its checkpoint, so the client gets every token's text exactly once; a bad entry is
dead-lettered and holds up none of the others read with it."""
from __future__ import annotations

import uuid

import pytest

from engine.model_files import resolve_model
from engine.output_processor import OutputProcessor
from engine.tokenizer import load_tokenizer
from schemas.codec import decode, encode
from schemas.limits import Limits
from schemas.messages import Reply, RequestMeta, StepTokens, WorkerInfo
from schemas.sampling_params import SamplingParams
from services.detokenizer import GROUP, DetokenizerService
from services.transport import FIELD, Transport

TEXT = "The capital of France is Paris, and the capital of Japan is Tokyo."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m-instruct", progress=False))


def replica(transport: Transport, tokenizer) -> DetokenizerService:
    """A replica that holds partition 0's lease (the only partition)."""
    service = DetokenizerService(transport, OutputProcessor(tokenizer), partitions=1)
    transport.redis.set(transport.names.partition_lease(0), service.consumer)
    service.owned = {0}
    return service


def publish_steps(transport: Transport, token_lists: dict[str, list[int]], first: int, last: int) -> None:
    """Steps first..last-1, as the publisher sends them: one columnar entry per step."""
    for step in range(first, last):
        rids = [r for r, tokens in token_lists.items() if step < len(tokens)]
        finish = ["length" if step == len(token_lists[r]) - 1 else None for r in rids]
        msg = StepTokens(step, rids, [0] * len(rids), [step] * len(rids), [token_lists[r][step] for r in rids],
                         finish, [None] * len(rids), num_cached_tokens=[0] * len(rids))
        transport.publish(transport.names.tokens(0), encode(msg))


def read_all(transport: Transport, service: DetokenizerService):
    return transport.read([transport.names.tokens(0)], GROUP, service.consumer, count=64, block_ms=None)


def texts(transport: Transport) -> tuple[dict[str, str], int]:
    """What the gateway got: each request's text (replies deduplicated by seq, as the gateway does), and how
    many reply messages carried it."""
    out: dict[str, str] = {}
    seen: set[tuple[str, int]] = set()
    entries = transport.redis.xrange(transport.names.reply("g0"))
    for _, fields in entries:
        for item in decode(Reply, fields[FIELD]).items:
            if (item.request_id, item.seq) not in seen:
                seen.add((item.request_id, item.seq))
                out[item.request_id] = out.get(item.request_id, "") + item.text
    return out, len(entries)


def test_batches_are_one_transaction_and_a_takeover_resumes_from_the_checkpoints(any_redis_url, tokenizer):
    transport = Transport(any_redis_url, prefix=f"detok-{uuid.uuid4().hex[:6]}", partitions=1)
    transport.ensure_group(transport.names.tokens(0), GROUP)
    token_lists = {f"r{i}": tokenizer.encode(TEXT[i:]) for i in range(3)}
    for rid, tokens in token_lists.items():
        params = SamplingParams(max_tokens=len(tokens))
        transport.redis.set(transport.names.request_meta(rid), encode(RequestMeta(rid, "g0", 5, [1, 2], params)))
    half = min(map(len, token_lists.values())) // 2

    first = replica(transport, tokenizer)
    publish_steps(transport, token_lists, 0, half)
    entries = read_all(transport, first)
    assert len(entries) == half > 1
    first._handle(0, entries)                               # one read: one transaction, one reply message
    assert texts(transport)[1] == 1
    pending = transport.redis.xpending(transport.names.tokens(0), GROUP)["pending"]
    assert pending == 0
    for rid, tokens in token_lists.items():                 # each completion's checkpoint: every token, in order
        handled = transport.redis.lrange(transport.names.detok_handled(rid, 0), 0, -1)
        assert [int(pair.split()[0]) for pair in handled] == tokens[:half]

    # The first replica is gone; a second one takes the partition over and goes on from the checkpoints.
    second = replica(transport, tokenizer)
    publish_steps(transport, token_lists, half, max(map(len, token_lists.values())))
    second._handle(0, read_all(transport, second))
    got, _ = texts(transport)
    assert got == {rid: TEXT[i:] for i, rid in enumerate(token_lists)}
    assert not second.requests                             # every request ended: nothing kept


@pytest.mark.parametrize("bad", ["not msgpack", "corrupt request", "columns of different lengths",
                                 "token beyond the vocabulary"])
def test_a_bad_entry_is_dead_lettered_and_holds_up_no_other(any_redis_url, tokenizer, bad):
    """Read in one batch with good entries: an entry that is not a StepTokens, one whose request's metadata is
    corrupt, one whose columns do not line up (it fails after the entries before it advanced their
    completions in memory, which must be rebuilt from the checkpoints), one with a token id the worker's
    vocabulary does not have (checked against the worker's registration)."""
    transport = Transport(any_redis_url, prefix=f"detok-{uuid.uuid4().hex[:6]}", partitions=1)
    transport.ensure_group(transport.names.tokens(0), GROUP)
    tokens = tokenizer.encode(TEXT)
    transport.redis.set(transport.names.request_meta("r"),
                        encode(RequestMeta("r", "g0", 5, [1, 2], SamplingParams(max_tokens=len(tokens)))))
    service = replica(transport, tokenizer)
    publish_steps(transport, {"r": tokens}, 0, 3)
    if bad == "not msgpack":
        transport.publish(transport.names.tokens(0), b"\x93not a step")
    elif bad == "corrupt request":
        transport.redis.set(transport.names.request_meta("x"), b"\x93garbage")
        publish_steps(transport, {"x": [5, 6]}, 0, 1)
    elif bad == "token beyond the vocabulary":
        info = WorkerInfo("w0", "e", 64, 16, 2048, tokenizer.vocab_size, [2])
        transport.redis.set(transport.names.worker_info("w0"), encode(info))
        service.limits = Limits.of(transport.worker_info("w0"))
        publish_steps(transport, {"r": tokens[:3] + [10**9]}, 3, 4)    # r's position 3; the good one follows
    else:
        meta = RequestMeta("x", "g0", 5, [1], SamplingParams())
        transport.redis.set(transport.names.request_meta("x"), encode(meta))
        transport.publish(transport.names.tokens(0), encode(StepTokens(0, ["x"], [0], [0], [], [None], [None])))
    publish_steps(transport, {"r": tokens}, 3, len(tokens))
    service._handle_safely(0, read_all(transport, service))
    assert texts(transport)[0] == {"r": TEXT}
    assert len(transport.redis.xrange(transport.names.dead_letter)) == 1
    assert transport.redis.xpending(transport.names.tokens(0), GROUP)["pending"] == 0
    assert service.owned == {0}
