"""What the server's prefix cache gave a run, and where it placed the run's requests: from /metrics before and after.

pagestream counts prefix-cache lookups and hits in prompt tokens over all its workers
(pagestream_prefix_cache_queries_total, pagestream_prefix_cache_hits_total) and, serving with data parallelism,
the requests it placed on each worker and why (pagestream_requests_placed_total{worker, reason}, the reasons
prefix, load, round_robin, migrated), and the requests it moved off a lost worker
(pagestream_requests_migrated_total). A run's figures are the differences of two scrapes, one before and one after
it, so the warm-up and earlier runs are left out. A server without these counters (vLLM, SGLang, an older
pagestream) has none of these figures, and nothing is printed for them.
"""
from __future__ import annotations

HITS = "pagestream_prefix_cache_hits_total"
QUERIES = "pagestream_prefix_cache_queries_total"
PLACED = "pagestream_requests_placed_total"
MIGRATED = "pagestream_requests_migrated_total"
WORKERS = "pagestream_workers"              # a gauge: the workers the scheduler drives now
# pagestream's scheduler publishes its counters every half second (services/scheduler.py, STATS_EVERY_S): a scrape
# this long after a run has ended sees all of it.
SETTLE_S = 1.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def counters(text: str) -> Samples:
    """These counters' samples in a Prometheus text exposition, by (name, labels); none in a text that is not one."""
    from prometheus_client.parser import text_string_to_metric_families
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (HITS, QUERIES, PLACED, MIGRATED, WORKERS):
                    out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    except ValueError:                      # some other format: the server has none of these counters
        return {}
    return out


def _total(samples: Samples, name: str) -> float | None:
    """The unlabelled sample (the aggregate), else the sum over label sets, else None."""
    if (name, ()) in samples:
        return samples[name, ()]
    values = [v for (n, _), v in samples.items() if n == name]
    return sum(values) if values else None


def _increase(old: float | None, new: float) -> float:
    """A counter's increase between two samples. A counter lower than before was reset meanwhile (pagestream's
    placement counts of a worker start again from zero when the worker comes back after it was lost), and counted
    from zero, as Prometheus does."""
    return new if old is None or new < old else new - old


def figures(before: str, after: str) -> dict:
    """The run between two scrapes: {"prefix_cache": {"queries", "hits" (tokens), "hit_rate"}, "placements":
    {worker: {reason: requests}}, "migrated": requests}, each key only where the server has its counters (a
    worker placed nothing in the run has an empty dict)."""
    old, new = counters(before), counters(after)
    out: dict = {}
    queries, hits = _total(new, QUERIES), _total(new, HITS)
    if queries is not None and hits is not None:
        queries -= _total(old, QUERIES) or 0.0
        hits -= _total(old, HITS) or 0.0
    if queries is not None and hits is not None and queries >= 0 and hits >= 0:
        # (a sum over workers that went down: a worker lost during the run took its counts with it, and the
        # run's lookups are unknown)
        out["prefix_cache"] = {"queries": int(queries), "hits": int(hits),
                               "hit_rate": hits / queries if queries > 0 else None}
    placed = {(dict(labels).get("worker", ""), dict(labels).get("reason", "")):
              _increase(old.get((name, labels)), value) for (name, labels), value in new.items() if name == PLACED}
    if placed:
        placements: dict[str, dict[str, int]] = {}
        for (worker, reason), count in sorted(placed.items()):
            reasons = placements.setdefault(worker, {})
            if count:
                reasons[reason] = int(count)
        out["placements"] = placements
    migrated = _total(new, MIGRATED)
    if migrated is not None:
        out["migrated"] = int(migrated - (_total(old, MIGRATED) or 0.0))
    return out


def placements_text(placements: dict[str, dict[str, int]]) -> str:
    """{"w0": {"prefix": 250, "load": 6}, "w1": {}} -> "w0 256 (prefix 250, load 6), w1 0"."""
    parts = []
    for worker, reasons in placements.items():
        detail = ", ".join(f"{reason} {n}" for reason, n in reasons.items())
        parts.append(f"{worker} {sum(reasons.values())}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts)


def hit_rate_text(prefix_cache: dict | None) -> str:
    if prefix_cache is None:
        return ""
    return "n/a" if prefix_cache["hit_rate"] is None else f"{prefix_cache['hit_rate']:.1%}"


def format_figures(run: dict) -> str:
    """The run's figures as rows in the style of loadtest.metrics.format_summary; "" when it has none."""
    rows = []                                               # (name, value, note after the value)
    if "prefix_cache" in run:
        cache = run["prefix_cache"]
        rows += [("Prefix cache hit rate (tokens)", hit_rate_text(cache), ""),
                 ("Prefix cache hits / lookups (tokens)", f"{cache['hits']}/{cache['queries']}", "")]
    for worker, reasons in run.get("placements", {}).items():
        detail = ", ".join(f"{reason} {n}" for reason, n in reasons.items())
        rows.append((f"Requests placed on {worker}", str(sum(reasons.values())), f"  ({detail})" if detail else ""))
    if run.get("migrated"):                                 # a worker was lost during the run
        rows.append(("Requests moved off a lost worker", str(run["migrated"]), ""))
    if not rows:
        return ""
    return "\n".join([f"{'-' * 14} Prefix cache and placement {'-' * 8}",
                      *(f"{name:<38}{value:>12}{note}" for name, value, note in rows), "=" * 50])
