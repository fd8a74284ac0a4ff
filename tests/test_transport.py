"""The stream transport against a real redis-server: consumer groups see what was sent before they existed,
abandoned entries are reclaimed, poison entries end in the dead-letter stream, streams stay trimmed."""
from __future__ import annotations

import uuid

import pytest

from services.transport import MAX_DELIVERIES, FIELD, Transport, partition_of


@pytest.fixture
def transport(any_redis_url):
    return Transport(any_redis_url, prefix=f"test-{uuid.uuid4().hex[:6]}", maxlen=50)


def test_a_group_gets_what_was_published_before_it_existed(transport):
    stream = transport.names.tokenize
    transport.publish(stream, b"early")
    entries = transport.read([stream], "g", "c1", block_ms=None)
    assert [e.payload for e in entries] == [b"early"]


def test_entries_of_a_dead_consumer_are_reclaimed_then_dead_lettered(transport):
    stream = transport.names.schedule
    transport.publish(stream, b"poison")
    assert transport.read([stream], "g", "dead", block_ms=None)       # delivered, never acknowledged
    for attempt in range(1, MAX_DELIVERIES):                          # each live consumer takes it over and dies
        entries = transport.reclaim(stream, "g", f"c{attempt}", min_idle_ms=0)
        assert [e.payload for e in entries] == [b"poison"]
    assert transport.reclaim(stream, "g", "last", min_idle_ms=0) == []          # one delivery too many
    dead = transport.redis.xrange(transport.names.dead_letter)
    assert dead and dead[-1][1][FIELD] == b"poison" and dead[-1][1][b"reason"] == b"too many deliveries"
    assert transport.redis.xpending(stream, "g")["pending"] == 0


def test_reclaim_leaves_fresh_entries_alone(transport):
    stream = transport.names.abort
    transport.publish(stream, b"x")
    transport.read([stream], "g", "busy", block_ms=None)
    assert transport.reclaim(stream, "g", "other", min_idle_ms=60_000) == []


def test_every_publish_trims(transport):
    stream = transport.names.events("w0")
    for i in range(2000):
        transport.publish(stream, str(i).encode())
    assert transport.redis.xlen(stream) < 200                         # MAXLEN ~ 50: approximately


def test_acknowledge_and_effect_in_one_transaction(transport):
    src, dst = transport.names.tokenize, transport.names.schedule
    transport.publish(src, b"m")
    [entry] = transport.read([src], "g", "c", block_ms=None)
    pipe = transport.pipeline()
    transport.publish(dst, b"effect", pipe)
    transport.ack(src, "g", [entry.id], pipe)
    pipe.execute()
    assert transport.redis.xpending(src, "g")["pending"] == 0 and transport.redis.xlen(dst) == 1


def test_partitions_are_stable_and_spread():
    ids = [f"cmpl-{i}" for i in range(800)]
    parts = [partition_of(r, 8) for r in ids]
    assert parts == [partition_of(r, 8) for r in ids]
    assert min(parts.count(p) for p in range(8)) > 60
