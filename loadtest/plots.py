"""PNG figures of a serving benchmark: latency CDFs, the inter-token latency histogram, and a rate sweep.

Each run is a dict as loadtest.serve writes it to the result JSON ({"request_rate", "summary", "requests"}), so
the plots can be redrawn from a saved file. matplotlib draws off-screen (Agg): no display is needed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from loadtest.metrics import METRICS  # noqa: E402

TITLES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency (per chunk)",
          "e2el": "end-to-end latency"}


def rate_label(rate) -> str:
    return "all at once" if rate in ("inf", float("inf")) else f"{rate:g} req/s"


def _samples(run: dict, name: str) -> list[float]:
    """Milliseconds, from the requests that succeeded."""
    ok = [r for r in run["requests"] if r["success"]]
    if name == "itl":
        return [x for r in ok for x in r["itl_ms"]]
    return [r[f"{name}_ms"] for r in ok if r[f"{name}_ms"] is not None]


def latency_cdfs(runs: list[dict], path: Path, title: str = "") -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, name in zip(axes.flat, METRICS):
        for run in runs:
            values = sorted(_samples(run, name))
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=rate_label(run["request_rate"]))
        ax.set_title(TITLES[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of chunks")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Latency CDFs{': ' + title if title else ''}")
    return _save(fig, path)


def itl_histogram(runs: list[dict], path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    samples = [_samples(run, "itl") for run in runs]
    top = max((max(v) for v in samples if v), default=1.0)
    bins = [top * i / 80 for i in range(81)]               # the same bins for every run, so they compare
    for run, values in zip(runs, samples):
        if values:
            ax.hist(values, bins=bins, histtype="step", linewidth=1.4, label=rate_label(run["request_rate"]))
    ax.set_xlabel("inter-token latency per chunk (ms)")
    ax.set_ylabel("chunks")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Inter-token latency{': ' + title if title else ''}")
    return _save(fig, path)


def sweep(runs: list[dict], path: Path, title: str = "") -> Path:
    """Throughput and latency against the offered request rate; 'all at once' (rate inf) stands at the right."""
    labels = ["inf" if r["request_rate"] in ("inf", float("inf")) else f"{r['request_rate']:g}" for r in runs]
    x = list(range(len(runs)))
    s = [r["summary"] for r in runs]
    fig, ((tokens, requests), (ttft, tpot)) = plt.subplots(2, 2, figsize=(12, 8))
    tokens.plot(x, [v["output_throughput"] for v in s], "o-", label="output")
    tokens.plot(x, [v["total_token_throughput"] for v in s], "s--", label="total (input + output)")
    tokens.set_ylabel("tokens/s")
    tokens.set_title("token throughput")
    requests.plot(x, [v["request_throughput"] for v in s], "o-", label="completed")
    if all("goodput" in v for v in s):
        bounds = ", ".join(f"{k} \u2264 {b:g} ms" for k, b in s[0]["slo_ms"].items())
        requests.plot(x, [v["goodput"] for v in s], "v:", label=f"goodput ({bounds})")
    requests.set_ylabel("requests/s")
    requests.set_title("request throughput")
    for ax, name in ((ttft, "ttft"), (tpot, "tpot")):
        for stat, style in (("median", "o-"), ("p90", "s--"), ("p99", "^:")):
            key = f"{stat}_{name}_ms"
            if all(key in v for v in s):
                ax.plot(x, [v[key] for v in s], style, label=stat)
        ax.set_ylabel("ms")
        ax.set_title(TITLES[name])
    for ax in (tokens, requests, ttft, tpot):
        ax.set_xticks(x, labels)
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Serving benchmark: rate sweep")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
