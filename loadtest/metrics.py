"""From per-request measurements to a run's summary: latency statistics, throughput and goodput.

Definitions (the ones vLLM's and SGLang's benchmarks use, so the figures compare):
  TTFT   time to first token: request sent -> first chunk carrying generated text
  ITL    inter-token latency: between consecutive chunks with text. A chunk may carry several tokens (a server
         that batches its output, or a multi-step engine), so this is per chunk, not divided per token
  TPOT   time per output token after the first: (E2EL - TTFT) / (output tokens - 1), for requests of 2+ tokens
  E2EL   end-to-end latency: request sent -> the last byte of the response
Throughputs divide by the run's duration (the first request sent -> the last response ended); only requests
that succeeded count. Goodput is the rate of requests that succeeded and met every SLO bound given (--slo
ttft:500 tpot:50, in milliseconds): the throughput a service with those promises actually delivers.
"""
from __future__ import annotations

import numpy as np

import statistics
from collections import Counter

from loadtest.client import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def tpot(out: RequestOutput) -> float | None:
    if not out.success or out.ttft is None or out.output_tokens < 2:
        return None
    return (out.e2el - out.ttft) / (out.output_tokens - 1)


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"SLO {item!r}: write NAME:MILLISECONDS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if slo[name] <= 0:
            raise ValueError(f"SLO {item!r}: the bound must be positive")
    return slo


def meets_slo(out: RequestOutput, slo: dict[str, float]) -> bool:
    if not out.success:
        return False
    values = {"ttft": out.ttft, "tpot": tpot(out), "e2el": out.e2el}
    for name, bound_ms in slo.items():
        value = values[name]
        if name == "tpot" and value is None and out.output_tokens == 1:
            continue                                      # one token has no time per output token to miss
        if value is None or value * 1000 > bound_ms:
            return False
    return True


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    return float(np.percentile(values, p)) if len(values) else float("nan")


def latency_values(outputs: list[RequestOutput]) -> dict[str, list[float]]:
    """Each metric's samples in seconds, from the requests that succeeded."""
    ok = [o for o in outputs if o.success]
    return {"ttft": [o.ttft for o in ok if o.ttft is not None],
            "tpot": [t for o in ok if (t := tpot(o)) is not None],
            "itl": [x for o in ok for x in o.itl],
            "e2el": [o.e2el for o in ok]}


def summarize(outputs: list[RequestOutput], duration_s: float, percentiles=(50, 90, 99),
              slo: dict[str, float] | None = None) -> dict:
    """The run's figures, latencies in milliseconds. Every key is always present (NaN where no sample)."""
    ok = [o for o in outputs if o.success]
    input_tokens = sum(o.usage_prompt_tokens if o.usage_prompt_tokens is not None else o.prompt_len for o in ok)
    output_tokens = sum(o.output_tokens for o in ok)
    summary = {
        "completed": len(ok), "failed": len(outputs) - len(ok), "duration_s": duration_s,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "output_tokens_from": dict(Counter(o.tokens_from for o in ok)),
        "total_chunks": sum(o.chunks for o in ok),
        "request_throughput": len(ok) / duration_s if duration_s > 0 else float("nan"),
        "output_throughput": output_tokens / duration_s if duration_s > 0 else float("nan"),
        "total_token_throughput": (input_tokens + output_tokens) / duration_s if duration_s > 0 else float("nan"),
        # Little's law: the mean number of requests in flight over the run.
        "mean_concurrency": sum(o.e2el for o in ok) / duration_s if duration_s > 0 else float("nan"),
    }
    for name, values in latency_values(outputs).items():
        ms = [v * 1000 for v in values]
        summary[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else float("nan")
        summary[f"median_{name}_ms"] = statistics.median(ms) if ms else float("nan")
        summary[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else float("nan")
        for p in percentiles:
            summary[f"p{p:g}_{name}_ms"] = percentile(ms, p)
        summary[f"max_{name}_ms"] = max(ms) if ms else float("nan")
    if slo:
        good = sum(meets_slo(o, slo) for o in outputs)
        summary["slo_ms"] = dict(slo)
        summary["good_requests"] = good
        summary["goodput"] = good / duration_s if duration_s > 0 else float("nan")
    errors = Counter(o.error for o in outputs if not o.success)
    summary["errors"] = dict(errors.most_common(10))
    return summary


def format_summary(summary: dict, title: str, percentiles=(50, 90, 99)) -> str:
    """The summary as a table for the terminal."""
    rows = [("Successful requests", f"{summary['completed']}"), ("Failed requests", f"{summary['failed']}"),
            ("Duration (s)", f"{summary['duration_s']:.2f}"),
            ("Input tokens", f"{summary['total_input_tokens']}"),
            ("Output tokens", f"{summary['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
            ("Mean concurrency", f"{summary['mean_concurrency']:.2f}")]
    if "goodput" in summary:
        bounds = " ".join(f"{k}:{v:g}" for k, v in summary["slo_ms"].items())
        rows.append((f"Goodput, {bounds} ms (req/s)", f"{summary['goodput']:.2f}"))
    names = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
             "itl": "Inter-token latency (per chunk)", "e2el": "End-to-end latency"}
    lines = [f"{'=' * 22} {title} {'=' * max(0, 27 - len(title))}"]
    lines += [f"{k:<38}{v:>12}" for k, v in rows]
    for name in METRICS:
        lines.append(f"{'-' * 14} {names[name]} {'-' * max(0, 35 - len(names[name]))}")
        for stat in ("mean", "median", *(f"p{p:g}" for p in percentiles if p != 50)):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms)':<38}{summary[f'{stat}_{name}_ms']:>12.2f}")
    for error, count in summary["errors"].items():
        lines.append(f"failed x{count}: {error[:100]}")
    lines.append("=" * 50)
    return "\n".join(lines)
