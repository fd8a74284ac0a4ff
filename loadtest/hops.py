"""Where a served request's time goes: the server's per-hop histograms, read from /metrics around a run.

pagestream's gateway exports two labelled histograms (services/metrics.py): the hops of each request's first
token, from the gateway taking the request to the client receiving the token (they add up to the time to first
token), and the delivery hops of every token, from the worker's host memory to the client. A run's breakdown is
the difference of two scrapes, one before and one after it, so earlier traffic (warm-up, other runs) is left
out. Quantiles are interpolated within buckets, as Prometheus' histogram_quantile does. A server without these
metrics (vLLM, SGLang) simply has no breakdown.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

FIRST_TOKEN = "pagestream_first_token_hop_seconds"
DELIVERY = "pagestream_token_hop_seconds"

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Series:
    """One label set of a histogram: cumulative counts per upper bound (le), the sum and the count."""
    buckets: dict[float, float]
    sum: float = 0.0
    count: float = 0.0

    def minus(self, before: "Series | None") -> "Series":
        if before is None:
            return self
        return Series({le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
                      self.sum - before.sum, self.count - before.count)

    def quantile(self, q: float) -> float:
        """histogram_quantile: linear within the bucket that holds rank q * count (the +Inf bucket answers
        with the largest finite bound)."""
        if self.count <= 0:
            return math.nan
        rank, lower, below = q * self.count, 0.0, 0.0
        for le in sorted(self.buckets):
            cumulative = self.buckets[le]
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 0.0)
            lower, below = le, cumulative
        return lower

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan


def parse_histograms(text: str, name: str, label: str = "hop") -> dict[str, Series]:
    """The histogram `name` of a Prometheus text exposition, one Series per value of `label`."""
    out: dict[str, Series] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or not m.group("name").startswith(name):
            continue
        suffix = m.group("name")[len(name):]
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        series = out.setdefault(labels.get(label, ""), Series({}))
        value = float(m.group("value"))
        if suffix == "_bucket":
            series.buckets[float(labels["le"])] = value
        elif suffix == "_sum":
            series.sum = value
        elif suffix == "_count":
            series.count = value
    return out


@dataclass
class HopRow:
    kind: str                  # "first token" or "every token"
    hop: str
    count: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    share: float | None        # of the mean time to first token (first-token hops only)


def breakdown(before: str, after: str) -> list[HopRow]:
    """The hops of the requests served between two scrapes of /metrics (empty if the server has none)."""
    rows = []
    for kind, name in (("first token", FIRST_TOKEN), ("every token", DELIVERY)):
        old, new = parse_histograms(before, name), parse_histograms(after, name)
        run = {hop: series.minus(old.get(hop)) for hop, series in new.items()}
        total = sum(s.mean for s in run.values() if s.count > 0)
        for hop, s in run.items():
            if s.count > 0:
                rows.append(HopRow(kind, hop, int(s.count), s.mean * 1000, s.quantile(0.5) * 1000,
                                   s.quantile(0.99) * 1000, s.mean / total if kind == "first token" else None))
    return rows


def format_breakdown(rows: list[HopRow], title: str = "where the time goes") -> str:
    if not rows:
        return f"{title}: the server exports no per-hop metrics"
    lines = [f"{title} (server's histograms; first-token hops add up to its time to first token)",
             f"  {'':12s} {'hop':24s} {'count':>8s} {'mean ms':>9s} {'p50 ms':>9s} {'p99 ms':>9s} {'share':>6s}"]
    for r in rows:
        share = f"{r.share:6.1%}" if r.share is not None else f"{'':6s}"
        lines.append(f"  {r.kind:12s} {r.hop:24s} {r.count:8d} {r.mean_ms:9.2f} {r.p50_ms:9.2f} {r.p99_ms:9.2f} "
                     f"{share}")
    return "\n".join(lines)
