"""Redis's memory stays bounded whatever is sent: dead letters keep only a message's first bytes and are capped in
number, and what a stream's groups have acknowledged is trimmed away. Against a real redis-server."""
from __future__ import annotations

import uuid

import pytest

from services.transport import DEAD_LETTER_BYTES, DEAD_LETTER_MAXLEN, FIELD, Transport, Trimmer


@pytest.fixture
def transport(any_redis_url):
    return Transport(any_redis_url, prefix=f"test-{uuid.uuid4().hex[:6]}")


def test_a_dead_lettered_10_mb_payload_is_stored_truncated(transport):
    stream = transport.names.schedule
    payload = bytes(range(256)) * (10 * 4096)                         # 10 MiB
    transport.publish(stream, payload)
    [entry] = transport.read([stream], "g", "c", block_ms=None)
    transport.dead_letter(stream, "g", entry.id, entry.payload, "token id 1000000000 beyond the vocabulary")
    [(_, dead)] = transport.redis.xrange(transport.names.dead_letter)
    assert dead[FIELD] == payload[:DEAD_LETTER_BYTES] and int(dead[b"length"]) == len(payload)
    assert dead[b"reason"] == b"token id 1000000000 beyond the vocabulary" and dead[b"id"] == entry.id
    assert transport.redis.xpending(stream, "g")["pending"] == 0
    transport.trim_acknowledged(stream)
    assert transport.redis.xlen(stream) == 0                          # and the original is gone
    assert transport.redis.memory_usage(transport.names.dead_letter) < 64 << 10


def test_the_dead_letter_stream_is_capped(transport):
    stream = transport.names.abort
    for i in range(DEAD_LETTER_MAXLEN * 3):
        transport.dead_letter(stream, "g", f"1-{i}".encode(), b"x" * 100, "bad")
    assert transport.redis.xlen(transport.names.dead_letter) < DEAD_LETTER_MAXLEN * 1.2   # MAXLEN ~: about


def test_acknowledged_entries_are_trimmed_pending_and_unread_ones_kept(transport):
    stream = transport.names.tokenize
    for i in range(10):
        transport.publish(stream, str(i).encode())
    entries = transport.read([stream], "g", "c", count=6, block_ms=None)
    transport.ack(stream, "g", [e.id for e in entries[:2] + entries[3:]])    # entry 2 stays pending
    assert transport.trim_acknowledged(stream) == 2
    assert [p for _, p in ((i, f[FIELD]) for i, f in transport.redis.xrange(stream))] == \
        [b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"]
    transport.ack(stream, "g", [entries[2].id])
    transport.trim_acknowledged(stream)
    # Everything delivered is acknowledged: all of it goes.
    assert [f[FIELD] for _, f in transport.redis.xrange(stream)] == [b"6", b"7", b"8", b"9"]
    assert [e.payload for e in transport.read([stream], "g", "c", block_ms=None)] == [b"6", b"7", b"8", b"9"]


def test_the_slowest_group_decides(transport):
    stream = transport.names.events("w0")
    for i in range(5):
        transport.publish(stream, str(i).encode())
    fast = transport.read([stream], "fast", "c", block_ms=None)
    transport.ack(stream, "fast", [e.id for e in fast])
    transport.ensure_group(stream, "slow")                            # has read nothing
    assert transport.trim_acknowledged(stream) == 0 and transport.redis.xlen(stream) == 5


def test_a_stream_without_groups_is_left_alone(transport):
    transport.publish(transport.names.reply("gw"), b"x")
    assert transport.trim_acknowledged(transport.names.reply("gw")) == 0
    assert transport.trim_acknowledged(transport.names.reply("nobody")) == 0    # no such stream


def test_the_trimmer_paces_itself(transport):
    stream = transport.names.tokenize
    trim = Trimmer(transport, [stream], every_s=60)
    transport.publish(stream, b"a")
    [entry] = transport.read([stream], "g", "c", block_ms=None)
    transport.ack(stream, "g", [entry.id])
    transport.publish(stream, b"b")
    [entry] = transport.read([stream], "g", "c", block_ms=None)
    transport.ack(stream, "g", [entry.id])
    trim()
    assert transport.redis.xlen(stream) == 0
    transport.publish(stream, b"c")
    [entry] = transport.read([stream], "g", "c", block_ms=None)
    transport.ack(stream, "g", [entry.id])
    trim()                                                            # too soon: nothing
    assert transport.redis.xlen(stream) == 1


def test_many_streams_are_trimmed_at_once(transport):
    streams = [transport.names.tokens(p) for p in range(4)]
    for stream in streams:
        for i in range(3):
            transport.publish(stream, str(i).encode())
    entries = transport.read(streams, "g", "c", block_ms=None)
    for stream in streams[:2]:                                        # two are handled, two still pending
        transport.ack(stream, "g", [e.id for e in entries if e.stream == stream])
    assert transport.trim_acknowledged(*streams, transport.names.tokens(99)) == 6
    assert [transport.redis.xlen(s) for s in streams] == [0, 0, 3, 3]
