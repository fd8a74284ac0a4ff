"""pagestream on a Redis Cluster: three redis-servers with cluster mode enabled on local ports, started by the
tests themselves (conftest.redis_cluster_url).

The keys that one command or transaction uses together share a hash slot and the rest spread over the nodes; a
transaction across slots acknowledges last; a read of streams in several slots gets what any of them holds; and
the whole pipeline, `pagestream serve` with a redis+cluster:// URL, passes tests/test_server_e2e.py's end-to-end
tests (imported below, so they run against this module's stack)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
import redis
from redis.cluster import RedisCluster

from conftest import free_cluster_port, start_stack, stop_stack
from services.redis_server import redis_server_binary, running_redis_cluster
from services.transport import (FIELD, REDIS_DOWN, ClusterTransaction, Names, RedisOutage, Transport,
                                _cluster_arguments, connect, is_cluster_url, partition_of)
from test_server_e2e import (test_200_concurrent_streams_survive_killed_tokenizer_and_detokenizer,  # noqa: F401
                             test_bad_input_gets_a_4xx_and_the_server_keeps_serving,
                             test_chat_equals_offline_engine, test_completions_equal_offline_engine,
                             test_disconnect_frees_kv_blocks, test_metrics_parse_and_show_the_pipeline,
                             test_n_stop_and_logprobs, test_wrong_or_missing_api_key_is_401)


@pytest.fixture
def transport(redis_cluster_url):
    return Transport(redis_cluster_url, prefix=f"c-{uuid.uuid4().hex[:6]}")


def nodes_holding(client: RedisCluster, keys: list[str]) -> set[str]:
    return {client.get_node_from_key(key).name for key in keys}


# ---- the URL ---------------------------------------------------------------------------------------------------
def test_a_cluster_url_names_its_nodes_and_shares_credentials_and_options():
    assert _cluster_arguments("redis+cluster://:pw@a:7000,b:7001, c:7002/0?socket_timeout=3") == \
        ("redis://:pw@a:7000?socket_timeout=3", [("b", 7001), ("c", 7002)])
    assert _cluster_arguments("rediss+cluster://user:pw@a:7000") == ("rediss://user:pw@a:7000", [])
    assert is_cluster_url("redis+cluster://a:1") and not is_cluster_url("redis://a:1")
    for bad, says in [("redis+cluster://a:7000,b", "host:port"), ("redis+cluster://a:7000/3", "database 0")]:
        with pytest.raises(ValueError, match=says):
            _cluster_arguments(bad)


def test_any_listed_node_finds_the_whole_cluster(redis_cluster_url):
    first, others = _cluster_arguments(redis_cluster_url)
    password = first.split("@")[0].rsplit(":", 1)[1]
    host, port = others[-1]                                  # only the last node: the others are discovered
    client = connect(f"redis+cluster://:{password}@{host}:{port}")
    assert isinstance(client, RedisCluster) and len(client.get_primaries()) == 3
    assert isinstance(connect(first), redis.Redis)           # a plain URL: one Redis, as before


# ---- the names -------------------------------------------------------------------------------------------------
def test_keys_used_together_share_a_slot_and_streams_spread(transport):
    names, client = Names("ps"), transport.redis             # the default prefix (slots depend on it)
    slot = client.keyslot
    # One XREADGROUP reads the scheduler's inputs.
    assert len({slot(k) for k in [names.schedule, names.abort, names.resume, names.events("w0")]}) == 1
    # A partition's stream, its lease and the keys of each of its requests: the detokenizer's one transaction.
    for rid in [f"cmpl-{i}" for i in range(20)]:
        partition = names.tokens(partition_of(rid, names.partitions))
        keys = [partition, names.partition_lease(partition_of(rid, names.partitions)), names.request_meta(rid),
                names.detok_state(rid, 0), names.detok_state(rid, 3), names.detok_done(rid)]
        assert len({slot(k) for k in keys}) == 1, keys
    # Heartbeats and statistics are each read together (MGET).
    assert len({slot(k) for k in [names.alive("scheduler"), names.alive("worker", "w0"),
                                  names.alive("gateway", "g1")]}) == 1
    assert slot(names.scheduler_stats) == slot(names.gateway_stats("g1"))
    # The partitions (and the other streams) spread over the nodes.
    assert nodes_holding(client, [names.tokens(p) for p in range(names.partitions)]) == \
        {node.name for node in client.get_primaries()}
    assert len(nodes_holding(client, [names.tokenize, names.schedule, names.plan("w0"), names.reply("g1"),
                                      names.dead_letter])) > 1


def test_names_read_back_for_people():
    names = Names("ps")
    assert [names.label(k) for k in [names.tokens(3), names.schedule, names.events("w0"), names.tokenize,
                                     names.reply("gw-1")]] == ["tokens:3", "schedule", "events:w0", "tokenize",
                                                               "reply:gw-1"]
    assert names.gateway_of_reply(names.reply("gw-1a2b")) == "gw-1a2b"


# ---- transactions and reads across slots -----------------------------------------------------------------------
def test_a_transaction_across_slots_acknowledges_last(transport):
    names, client = transport.names, transport.redis
    src, dst = names.tokenize, names.schedule
    assert client.keyslot(src) != client.keyslot(dst)
    transport.publish(src, b"m")
    [entry] = transport.read([src], "g", "c", block_ms=None)
    client.set(names.reply("broken"), b"not a stream")
    pipe = transport.pipeline()
    assert isinstance(pipe, ClusterTransaction)
    transport.ack(src, "g", [entry.id], pipe)                # queued first, but runs last
    transport.publish(dst, b"effect", pipe)
    transport.publish(names.reply("broken"), b"fails", pipe)  # an effect that fails (WRONGTYPE)
    with pytest.raises(redis.ResponseError):
        pipe.execute()
    assert client.xpending(src, "g")["pending"] == 1        # not acknowledged: it will be handled again
    pipe = transport.pipeline()
    transport.ack(src, "g", [entry.id], pipe)
    transport.publish(dst, b"effect", pipe)
    pipe.set(names.request_meta("r1"), b"meta")
    results = pipe.execute()                                 # in the order queued
    assert results[0] == 1 and results[1] == client.xrevrange(dst, count=1)[0][0]
    assert client.get(names.request_meta("r1")) == b"meta"
    assert client.xpending(src, "g")["pending"] == 0 and client.xlen(dst) == 2      # the effect, repeated


def test_a_read_over_streams_on_several_nodes_gets_each_of_them(transport):
    names, client = transport.names, transport.redis
    streams = [names.tokens(p) for p in range(32)]           # (32 slots: every node holds some of them)
    assert transport.read(streams, "d", "c", block_ms=None) == []
    one = {client.get_node_from_key(s).name: s for s in streams}         # a stream on each node
    assert len(one) == 3
    for stream in one.values():
        transport.publish(stream, stream.encode())
    got = transport.read(streams, "d", "c", block_ms=100)
    assert sorted(e.payload for e in got) == sorted(s.encode() for s in one.values())
    started = time.monotonic()
    assert transport.read(streams, "d", "c", block_ms=100) == []
    assert time.monotonic() - started >= 0.1                 # nothing there: it waited block_ms
    # Something arriving on any slot while it waits ends the wait early.
    late = Transport(transport.url, transport.names.prefix)
    threading.Timer(0.05, lambda: late.publish(names.tokens(5), b"late")).start()
    started = time.monotonic()
    got = transport.read(streams, "d", "c", block_ms=2000)
    assert [e.payload for e in got] == [b"late"] and time.monotonic() - started < 1.0
    # Read again after a lost connection: the consumer's pending entries first, from every slot.
    transport.lost_connection()
    again = transport.read(streams, "d", "c", block_ms=None)
    assert sorted(e.payload for e in again) == sorted([b"late", *(s.encode() for s in one.values())])


def test_trimming_and_dead_letters_across_slots(transport):
    names, client = transport.names, transport.redis
    streams = [names.tokens(p) for p in range(4)]
    for stream in streams:
        for i in range(3):
            transport.publish(stream, b"%d" % i)
    entries = transport.read(streams, "d", "c", block_ms=None, count=10)
    for e in entries:
        transport.ack(e.stream, "d", [e.id])
    assert transport.trim_acknowledged(*streams) == 12 and sum(client.xlen(s) for s in streams) == 0
    transport.publish(streams[0], b"poison")
    [entry] = transport.read(streams, "d", "c", block_ms=None)
    transport.dead_letter(entry.stream, "d", entry.id, entry.payload, "bad")
    [(_, fields)] = client.xrange(names.dead_letter)
    assert fields[FIELD] == b"poison" and client.xpending(streams[0], "d")["pending"] == 0


def test_a_node_that_goes_away_is_an_outage_and_comes_back_with_its_streams():
    """kill -9 of the node holding a stream: an outage (REDIS_DOWN), which the services' loops wait out, until the
    node is back (started again from its configuration, its append-only file and its cluster state)."""
    with running_redis_cluster([free_cluster_port() for _ in range(3)]) as url:
        transport = Transport(url, prefix="down")
        stream = transport.names.tokens(0)
        transport.publish(stream, b"before")
        node = transport.redis.get_node_from_key(stream).redis_connection
        pid, directory = node.info("server")["process_id"], node.config_get("dir")["dir"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(REDIS_DOWN):
            transport.publish(stream, b"lost")
        restarted = subprocess.Popen([redis_server_binary(), f"{directory}/redis.conf"], stdout=subprocess.DEVNULL)
        try:
            outage, deadline = RedisOutage("test"), time.monotonic() + 30
            while True:
                try:
                    transport.publish(stream, b"after")
                    break
                except REDIS_DOWN as e:
                    assert time.monotonic() < deadline, "the node did not come back"
                    time.sleep(outage.failed(e))
            assert [fields[FIELD] for _, fields in transport.redis.xrange(stream)] == [b"before", b"after"]
        finally:
            restarted.terminate()
            restarted.wait()


# ---- the whole pipeline on the cluster ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_stack(tmp_path_factory, redis_cluster_url):
    """`pagestream serve` on the cluster (this module's stand-in for conftest's serve_stack: the imported
    end-to-end tests run on it)."""
    stack = start_stack(tmp_path_factory.mktemp("cluster-stack"), "--tokenizers", "2", "--detokenizers", "2",
                        redis_url=redis_cluster_url)
    yield stack
    stop_stack(stack)


def test_served_keys_spread_over_the_cluster(serve_stack, client):
    for prompt in ["a", "b", "c", "d", "e", "f"]:
        client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=2)
    cluster = connect(serve_stack.redis_url)
    per_node = {node.name: [k.decode() for k in node.redis_connection.scan_iter(match=f"{{{serve_stack.prefix}:*")]
                for node in cluster.get_primaries()}
    partitions = Names(serve_stack.prefix).tokens("")[:-1]  # how every partition's keys begin
    assert len([node for node, keys in per_node.items() if keys]) > 1, per_node
    assert len([node for node, keys in per_node.items() if any(k.startswith(partitions) for k in keys)]) > 1
