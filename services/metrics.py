"""Prometheus metrics in the text exposition format (0.0.4), without prometheus_client.

    requests = Counter("pagestream_requests_total", "Requests by outcome.", ["status"])
    requests.inc(status="200")
    text = exposition([requests, ...])

The gateway's own metrics (GatewayMetrics) are counted as requests go by. The pipeline's are read from Redis when
scraped (PipelineScraper): the scheduler's stats hash, and per stream and consumer group how far consumers are
behind, all in one round trip (plus a SCAN for the token partitions every PARTITIONS_TTL_S).
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from typing import Any, Callable, Iterable

from schemas.codec import SchemaError, decode, encode
from schemas.messages import (DELIVERY_HOPS, DELIVERY_STAMPS, FIRST_TOKEN_HOPS, FIRST_TOKEN_STAMPS, GatewayStats,
                              MetricSeries)
from services.transport import REDIS_DOWN, Names, RedisOutage

log = logging.getLogger("pagestream.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PARTITIONS_TTL_S = 10.0

# Bucket bounds (seconds), from about one decode step on an H100 up to long generations.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
# Hops run from tens of microseconds (a local Redis round trip) to seconds (waiting for admission).
HOP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)


# ---- exposition ------------------------------------------------------------------------------------------------
def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)

    def _key(self, labels: dict[str, Any]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)}, expected {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class _Valued(Metric):
    """A counter or gauge: one value per label set (an unlabelled one starts at 0)."""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}"
                                for k, v in self.values.items()]


    def series_values(self) -> Iterable[tuple[tuple[str, ...], list[float]]]:
        return ((key, [value]) for key, value in self.values.items())

    def add_series(self, key: tuple[str, ...], values: list[float]) -> None:
        self.values[key] = self.values.get(key, 0.0) + values[0]


class Counter(_Valued):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


class Gauge(_Valued):
    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        self.values[self._key(labels)] = value


class Histogram(Metric):
    """`bounds` are the finite bucket bounds (le), +Inf is implied; with labelnames, one set of buckets per label
    set (observe(value, hop="gpu_step"))."""
    kind = "histogram"

    def __init__(self, name: str, help: str, bounds: Iterable[float], labelnames: Iterable[str] = ()):
        super().__init__(name, help, labelnames)
        self.bounds = tuple(sorted(bounds))
        # Per label set: counts per bucket (not cumulative; the last is +Inf) and the sum.
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not self.labelnames:
            self._series(())

    def _series(self, key: tuple[str, ...]) -> tuple[list[int], list[float]]:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = ([0] * (len(self.bounds) + 1), [0.0])
        return series

    @classmethod
    def from_cumulative(cls, name: str, help: str, buckets: list[tuple[float, float]], total: float
                        ) -> "Histogram":
        """A snapshot kept elsewhere, as Prometheus writes it: (le, cumulative count) pairs ending with +Inf."""
        buckets = sorted(buckets)
        h = cls(name, help, [le for le, _ in buckets if not math.isinf(le)])
        counts, sum_ = h._series(())
        previous = 0.0
        for i, (_, cumulative) in enumerate(buckets):
            counts[i] = cumulative - previous
            previous = cumulative
        sum_[0] = total
        return h

    def series_values(self) -> Iterable[tuple[tuple[str, ...], list[float]]]:
        return ((key, counts + sum_) for key, (counts, sum_) in self.series.items())

    def add_series(self, key: tuple[str, ...], values: list[float]) -> None:
        counts, sum_ = self._series(key)
        for i, v in enumerate(values[:-1]):
            counts[i] += v
        sum_[0] += values[-1]

    def observe(self, value: float, **labels: Any) -> None:
        counts, sum_ = self._series(self._key(labels))
        counts[bisect.bisect_left(self.bounds, value)] += 1        # le: a value on a bound counts in it
        sum_[0] += value

    def lines(self) -> list[str]:
        out = self.header()
        for key, (counts, sum_) in self.series.items():
            labels = list(zip(self.labelnames, key))
            def series(suffix: str, extra: list[tuple[str, str]] = []) -> str:   # noqa: B006
                pairs = labels + extra
                return self.name + suffix + _labels(tuple(n for n, _ in pairs), tuple(v for _, v in pairs))
            cumulative = 0
            for le, count in zip((*self.bounds, math.inf), counts):
                cumulative += count
                out.append(f"{series('_bucket', [('le', format_value(le))])} {format_value(cumulative)}")
            out.append(f"{series('_sum')} {format_value(sum_[0])}")
            out.append(f"{series('_count')} {format_value(cumulative)}")
        return out


def exposition(metrics: Iterable[Metric]) -> str:
    return "\n".join(line for m in metrics for line in m.lines()) + "\n"


# ---- the gateway's own -----------------------------------------------------------------------------------------
class GatewayMetrics:
    """What the gateway measures itself (shared by its HTTP and gRPC front ends)."""

    def __init__(self) -> None:
        self.requests = Counter("pagestream_requests_total",
                                "Generation requests by outcome: the HTTP status, 499 where the client went away.",
                                ["status"])
        self.generation_tokens = Counter("pagestream_generation_tokens_total", "Tokens generated.")
        self.prompt_tokens = Counter("pagestream_prompt_tokens_total", "Prompt tokens of requests answered.")
        self.time_to_first_token = Histogram("pagestream_time_to_first_token_seconds",
                                             "From a request's arrival to its first token.", TTFT_BUCKETS)
        self.inter_token_latency = Histogram("pagestream_inter_token_latency_seconds",
                                             "Between successive token deltas of a completion.", ITL_BUCKETS)
        self.e2e_request_latency = Histogram("pagestream_e2e_request_latency_seconds",
                                             "From a request's arrival to its last token.", E2E_BUCKETS)
        self.first_token_hops = Histogram(
            "pagestream_first_token_hop_seconds", "Where a request's time to first token goes, hop by hop (they "
            "add up to it): " + ", ".join(FIRST_TOKEN_HOPS) + ".", HOP_BUCKETS, ["hop"])
        self.token_hops = Histogram(
            "pagestream_token_hop_seconds", "Every token's delivery, hop by hop, from the worker's host memory to "
            "the client: " + ", ".join(DELIVERY_HOPS) + ".", HOP_BUCKETS, ["hop"])

    def all(self) -> list[Metric]:
        return [self.requests, self.generation_tokens, self.prompt_tokens, self.time_to_first_token,
                self.inter_token_latency, self.e2e_request_latency, self.first_token_hops, self.token_hops]

    def snapshot(self, gateway: str) -> GatewayStats:
        return GatewayStats(gateway, [MetricSeries(m.name, list(key), values) for m in self.all()
                                      for key, values in m.series_values()])

    def merged(self, peers: Iterable[GatewayStats]) -> list[Metric]:
        """These metrics summed with other gateways' snapshots (series that fit no metric are left out)."""
        total = GatewayMetrics()
        by_name = {m.name: m for m in total.all()}
        for m in self.all():
            for key, values in m.series_values():
                by_name[m.name].add_series(key, values)
        for stats in peers:
            for series in stats.series:
                metric = by_name.get(series.name)
                if metric is None or len(series.labels) != len(metric.labelnames):
                    continue
                width = len(metric.bounds) + 2 if isinstance(metric, Histogram) else 1     # counts and sum
                if len(series.values) == width:
                    metric.add_series(tuple(series.labels), series.values)
        return total.all()

    def observe_hops(self, stamps: list[float], to_client: bool) -> None:
        """A token's stamps, the gateway's two included (schemas.messages: FIRST_TOKEN_STAMPS for a request's
        first token, else DELIVERY_STAMPS), as hops; a first token's delivery counts among every token's. A
        response sent whole has no gateway_to_client hop. Clocks of different hosts may disagree a little: no
        hop is negative."""
        if len(stamps) == len(FIRST_TOKEN_STAMPS):
            _observe(self.first_token_hops, FIRST_TOKEN_HOPS, stamps, to_client)
        if len(stamps) in (len(FIRST_TOKEN_STAMPS), len(DELIVERY_STAMPS)):
            _observe(self.token_hops, DELIVERY_HOPS, stamps[-len(DELIVERY_STAMPS):], to_client)


def _observe(histogram: Histogram, hops: tuple[str, ...], stamps: list[float], to_client: bool) -> None:
    for hop, start, end in zip(hops, stamps, stamps[1:]):
        if to_client or hop != "gateway_to_client":
            histogram.observe(max(0.0, end - start), hop=hop)


# ---- the pipeline's, read from Redis at scrape time ------------------------------------------------------------
# stats hash field -> (metric, kind, help)
SCHEDULER_FIELDS = {
    "running": ("pagestream_num_requests_running", Gauge, "Requests running on the worker."),
    "waiting": ("pagestream_num_requests_waiting", Gauge, "Requests waiting for admission."),
    "preemptions": ("pagestream_num_preemptions_total", Counter, "Sequences preempted for lack of KV blocks."),
    "kv_blocks_total": ("pagestream_kv_blocks_capacity", Gauge, "KV cache blocks in the pool."),
    "kv_blocks_used": ("pagestream_kv_blocks_used", Gauge, "KV cache blocks in use."),
    "kv_usage": ("pagestream_kv_cache_usage_ratio", Gauge, "Fraction of KV cache blocks in use."),
    "kv_slot_waste": ("pagestream_kv_cache_slot_waste_ratio", Gauge,
                      "Fraction of the used blocks' token slots that hold no token."),
    "prefix_cache_queries": ("pagestream_prefix_cache_queries_total", Counter, "Prefix cache lookups (tokens)."),
    "prefix_cache_hits": ("pagestream_prefix_cache_hits_total", Counter, "Prefix cache hits (tokens)."),
    "prefix_cache_hit_rate": ("pagestream_prefix_cache_hit_rate", Gauge, "Prefix cache hits / queries."),
    "beam_kv_blocks_saved": ("pagestream_beam_search_kv_blocks_saved", Gauge,
                             "KV blocks the running beam searches' beams share now (independent sequences would "
                             "hold this many more)."),
    "beam_searches": ("pagestream_beam_searches_total", Counter, "Beam searches finished."),
    "beam_kv_blocks_saved_peak": ("pagestream_beam_search_kv_blocks_saved_peak_total", Counter,
                                  "Over the finished beam searches, the sum of the most KV blocks each one's "
                                  "beams shared at once."),
}
# Each worker's own (data parallel), from the fields worker:<name>:<field>, labelled by worker.
WORKER_FIELDS = {
    "running": ("pagestream_worker_requests_running", Gauge, "Sequences running on a worker."),
    "waiting": ("pagestream_worker_requests_waiting", Gauge, "Sequences waiting for admission on a worker."),
    "kv_usage": ("pagestream_worker_kv_cache_usage_ratio", Gauge, "Fraction of a worker's KV cache blocks in use."),
    "prefix_cache_queries": ("pagestream_worker_prefix_cache_queries_total", Counter,
                             "A worker's prefix cache lookups (tokens)."),
    "prefix_cache_hits": ("pagestream_worker_prefix_cache_hits_total", Counter,
                          "A worker's prefix cache hits (tokens)."),
    "prefix_cache_hit_rate": ("pagestream_worker_prefix_cache_hit_rate", Gauge,
                              "A worker's prefix cache hits / queries."),
}
PLACED = ("pagestream_requests_placed_total", "Requests placed on a worker, by why: prefix (its cache holds the "
          "prompt's prefix), load (the least loaded), round_robin, migrated (its worker was lost).")
QUEUE_TIME = ("pagestream_request_queue_time_seconds", "From a request's arrival to its admission by the "
              "scheduler.")


def _number(value: Any) -> float | None:
    try:
        return float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return None


def scheduler_metrics(stats: dict) -> list[Metric]:
    """The scheduler's stats hash (field -> string) as metrics; a missing or unreadable field is left out."""
    stats = {(k.decode() if isinstance(k, bytes) else k): _number(v) for k, v in stats.items()}
    out: list[Metric] = []
    for key, (name, kind, help) in SCHEDULER_FIELDS.items():
        if stats.get(key) is not None:
            metric = kind(name, help)
            metric.values[()] = stats[key]
            out.append(metric)
    if stats.get("workers") is not None:
        metric = Gauge("pagestream_workers", "Workers alive (data parallel: each with its own KV cache).")
        metric.values[()] = stats["workers"]
        out.append(metric)
    if stats.get("migrated") is not None:
        metric = Counter("pagestream_requests_migrated_total", "Requests moved off a lost worker, recomputed on "
                         "another.")
        metric.values[()] = stats["migrated"]
        out.append(metric)
    per_worker = {key: kind(name, help, ["worker"]) for key, (name, kind, help) in WORKER_FIELDS.items()}
    placed = Counter(*PLACED, ["worker", "reason"])
    for key, value in stats.items():
        if not key.startswith("worker:") or value is None:
            continue
        worker, _, field = key[len("worker:"):].rpartition(":")
        if field in per_worker:
            metric = per_worker[field]
            metric.values[metric._key({"worker": worker})] = value
        elif worker.endswith(":placed"):                   # worker:<name>:placed:<reason>
            placed.values[placed._key({"worker": worker[:-len(":placed")], "reason": field})] = value
    out += [m for m in [*per_worker.values(), placed] if m.values]
    buckets = [(_number(k.split(":", 1)[1]), v) for k, v in stats.items() if k.startswith("queue_time_bucket:")]
    total = stats.get("queue_time_sum")
    if buckets and total is not None and all(le is not None and v is not None for le, v in buckets) \
            and any(math.isinf(le) for le, _ in buckets):
        out.append(Histogram.from_cumulative(*QUEUE_TIME, buckets, total))
    return out


def _ms(stream_id: Any) -> int:
    """The millisecond part of a stream entry id ("1700000000000-3")."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
    return int(text.split("-", 1)[0])


def stream_metrics(streams: list[tuple[str, dict | None, list[dict]]]) -> list[Metric]:
    """Per (stream, group): entries pending (delivered, not acknowledged), entries not yet delivered (Redis 7
    reports that `lag`; 6.2 does not), and the same lag in time: the newest entry's id time minus the last
    delivered one's. Input: (label, XINFO STREAM, XINFO GROUPS) per stream; XINFO STREAM None: no stream."""
    pending = Gauge("pagestream_stream_pending_entries", "Entries delivered to a group, not yet acknowledged.",
                    ["stream", "group"])
    lag_entries = Gauge("pagestream_stream_lag_entries", "Entries not yet delivered to a group (Redis 7+).",
                        ["stream", "group"])
    lag_seconds = Gauge("pagestream_stream_lag_seconds", "Age of a stream's newest entry relative to the last "
                        "entry delivered to a group (entry id times).", ["stream", "group"])
    for label, info, groups in streams:
        if info is None:
            continue
        newest = _ms(info["last-generated-id"])
        first = info.get("first-entry")
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            pending.set(g["pending"], stream=label, group=name)
            if g.get("lag") is not None:
                lag_entries.set(g["lag"], stream=label, group=name)
            delivered = _ms(g["last-delivered-id"])
            if delivered == 0:            # nothing delivered yet: the backlog starts at the oldest entry
                delivered = _ms(first[0]) if first else newest
            lag_seconds.set(max(0, newest - delivered) / 1000, stream=label, group=name)
    return [pending, lag_entries, lag_seconds]


class PipelineScraper:
    """Reads the pipeline's metrics from Redis; Redis being down leaves them out (the gateway's own remain).

    The gateway reads its reply stream with XREAD, not through a group, so Redis cannot tell how far behind it
    is: reply_read_id() gives the id of the last entry it read, reported as the stream's group "gateway" (None:
    nothing read yet, or not known; then the reply stream is left out)."""

    def __init__(self, redis, names: Names, reply_stream: str, reply_read_id: Callable[[], bytes | None]):
        self.redis, self.names = redis, names
        self.reply_stream, self.reply_read_id = reply_stream, reply_read_id
        self.fixed_streams = [names.tokenize, names.schedule, names.abort, reply_stream]
        self._partitions: list[str] = []
        self._partitions_at = -math.inf

    async def _token_streams(self) -> list[str]:
        """tokens:<p> streams that exist, found by SCAN (the partition count is the worker's setting)."""
        if time.monotonic() - self._partitions_at > PARTITIONS_TTL_S:
            found = [key async for key in self.redis.scan_iter(match=self.names.tokens("*"), count=1000,
                                                                _type="STREAM")]
            self._partitions = sorted(k.decode() if isinstance(k, bytes) else k for k in found)
            self._partitions_at = time.monotonic()
        return self._partitions

    async def collect(self) -> list[Metric]:
        try:
            workers = sorted(w.decode() if isinstance(w, bytes) else w
                             for w in await self.redis.smembers(self.names.workers))
            streams = self.fixed_streams + [s for w in workers for s in (self.names.plan(w), self.names.events(w))] \
                + await self._token_streams()
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.names.scheduler_stats)
            for stream in streams:
                pipe.xinfo_stream(stream)
                pipe.xinfo_groups(stream)
            results = await pipe.execute(raise_on_error=False)
        except Exception as e:                       # Redis down: serve what the gateway knows
            log.warning("could not read the pipeline's metrics from Redis: %s", e)
            return []
        stats, infos = results[0], results[1:]
        per_stream = []
        for i, stream in enumerate(streams):
            info, groups = infos[2 * i], infos[2 * i + 1]
            if isinstance(info, Exception):          # "no such key": the stream does not exist (yet)
                continue
            groups = [] if isinstance(groups, Exception) else groups
            if stream == self.reply_stream:
                read = self.reply_read_id()
                groups = [] if read is None else [{"name": "gateway", "pending": 0, "last-delivered-id": read}]
            per_stream.append((self.names.label(stream), info, groups))
        return (scheduler_metrics(stats) if isinstance(stats, dict) else []) + stream_metrics(per_stream)


# ---- several gateways ------------------------------------------------------------------------------------------
GATEWAY_STATS_EVERY_S = 1.0
GATEWAY_STATS_TTL_S = 3600        # a gone gateway's counts stay in the sums for an hour, then drop out


async def publish_gateway_stats(redis, names: Names, gateway: str, metrics: GatewayMetrics) -> None:
    """Every second, this gateway's metrics where its peers read them (runs until cancelled)."""
    outage = RedisOutage("publishing the gateway's metrics")
    while True:
        try:
            await redis.set(names.gateway_stats(gateway), encode(metrics.snapshot(gateway)), ex=GATEWAY_STATS_TTL_S)
        except asyncio.CancelledError:
            raise
        except REDIS_DOWN as e:                      # logged once; the next round tries again
            outage.failed(e)
        except Exception as e:
            log.warning("could not publish the gateway's metrics: %s", e)
        else:
            outage.recovered()
        await asyncio.sleep(GATEWAY_STATS_EVERY_S)


async def peer_gateway_stats(redis, names: Names, gateway: str) -> list[GatewayStats]:
    """The other gateways' latest snapshots (a malformed one is left out)."""
    keys = [k async for k in redis.scan_iter(match=names.gateway_stats("*"), count=1000)]
    own = names.gateway_stats(gateway).encode()
    keys = [k for k in keys if k != own]
    out = []
    for raw in await redis.mget(keys) if keys else []:
        if raw is None:
            continue
        try:
            out.append(decode(GatewayStats, raw))
        except SchemaError as e:
            log.warning("a gateway's metrics are malformed: %s", e)
    return out
