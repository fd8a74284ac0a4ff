"""What data parallelism buys, in one command: one worker against N, cache-blind against cache-aware placement,
and what losing a worker under load costs.

    pagestream bench data-parallel --model llama-3-8b --load-format dummy --tokenizer smollm2-135m-instruct \\
        --data-parallel-size 2                                                                       (2 GPUs)
    CUDA_VISIBLE_DEVICES=0,0 pagestream bench data-parallel --model llama-3-8b --load-format dummy \\
        --tokenizer smollm2-135m-instruct --data-parallel-size 2 --num-blocks 12000 --workload w256 \\
        --num-prompts 256                                                    (2 workers sharing one GPU)
    pagestream bench data-parallel --data-parallel-size 1 --workload w256 --scale 0.05 --num-prompts 16 \\
        --prefix-count 4 --prefix-len 64 --suffix-len 16 --output-len 8                              (CPU)

Five runs, each of every request sent at once to a `pagestream serve` started here with this command's engine
flags (loadtest/pipeline.py's start_server, after its warm-up requests, one per worker):
  (a) the workload (--workload, default w1000) on one worker;
  (b) the same on --data-parallel-size N workers, placed by prompt prefix (serve's default);
  (c) the prefix dataset (loadtest/datasets.py: --prefix-count prompt prefixes of --prefix-len tokens, each
      request one of them and a question of --suffix-len tokens) on N workers, placed round-robin;
  (d) the same placed by prompt prefix;
  (e) (b) again, on (b)'s server, with the last worker (w{N-1}) killed with SIGKILL: by default once half of the
      run's requests had their first token, as the server counts them (its time-to-first-token histogram), so that
      every request has been placed and the killed worker's are decoding; --kill-after seconds into the run if
      given. (Not at (b)'s median TTFT: a server's first run can be several times slower than its later ones, and
      (e) would end before the kill.) The server moves the killed worker's requests to a live worker, which
      prefills each again from its prompt and the tokens it had (services/scheduler.py), and restarts the killed
      worker a second later (too late to matter within the run: it loads the model again). Left out with
      --no-kill and with one worker (its requests would wait for its restart, which measures the restart).
Then one table: output tok/s, (b) / (a), (d) / (c) and (e) / (b), TTFT and end-to-end latency p50 and p99, failed
requests, the prefix cache's hit rate and the requests each worker took and why (loadtest/placement.py: in (e),
the moved ones among the survivor's, as "migrated"; the killed worker's own counts go with it); under it, what
the kill cost.

The kill's cost: the requests the server moved, m (the run's difference of pagestream_requests_migrated_total),
and their added end-to-end time. The client cannot see which requests moved, but (e) sends (b)'s requests in
(b)'s order, so request i's end-to-end latency in (e) minus its latency in (b) is what the kill cost request i.
A moved request lost its KV cache, waited for the scheduler to see its worker gone (a heartbeat's time to live),
and was prefilled again behind the surviving worker's own requests: the m largest increases are taken as the
moved requests', shown as their p50, p99 and max. The median increase of the other requests is the baseline:
run-to-run noise plus what the surviving worker's extra load cost the requests that stayed on it. Where a moved
request gained less than one that stayed (one moved just before it would have finished), the m largest include
the other instead: the figures lean high by at most the spread of the baseline.

Runs with the same serve flags share a server, started once ((b), (d) and (e) on N workers, in that order; all
four with --data-parallel-size 1, which leaves the data-parallel flags out, as a server of one worker needs none:
so it runs on one GPU or the CPU). Every run's prompts start with its number, so none finds an earlier run's in
the prefix cache. Several workers on one GPU (CUDA_VISIBLE_DEVICES=0,0: serve gives each worker one entry of the
list) need a fixed KV pool each (--num-blocks): the memory budget would count the other worker's memory against
its own. Throughput then is no data-parallel speed-up, but placement ((c), (d)) and the kill ((e)) mean the same.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from loadtest import placement
from loadtest.client import HTTPClient
from loadtest.hops import parse_histograms
from loadtest.metrics import percentile
from loadtest.pipeline import _log, add_server_arguments, served_runs, server_log_dir, start_server, stop_server
from loadtest.processes import argv, descendants
from loadtest.serve import jsonable, scrape_metrics

FIRST_TOKEN = "pagestream_time_to_first_token_seconds"      # services/metrics.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data-parallel benchmark")
    group.add_argument("--data-parallel-size", type=int, default=2, help="workers of runs (b) to (e)")
    group.add_argument("--workload", default="w1000", help="runs (a), (b), (e): w256, w1000, or a workload JSON file")
    group.add_argument("--scale", type=float, default=1.0, help="multiply the workload's input and output lengths")
    group.add_argument("--num-prompts", type=int, default=None,
                       help="requests per run (default: all of the workload's; 512 of the prefix dataset)")
    group.add_argument("--prefix-count", type=int, default=32, help="runs (c) and (d): shared prompt prefixes")
    group.add_argument("--prefix-len", type=int, default=1000, help="tokens of each shared prefix")
    group.add_argument("--suffix-len", type=int, default=100, help="tokens of each request's own question")
    group.add_argument("--output-len", type=int, default=128, help="output tokens of each prefix-dataset request")
    group.add_argument("--kill-after", type=float, default=None,
                       help="run (e): seconds into the run to kill the last worker (default: once half of the "
                            "run's requests had their first token)")
    group.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                       help="run (e), the last worker killed under load (with more than one worker)")
    add_server_arguments(group)
    group.add_argument("--result-json", type=Path, default=None, help="also write the results here, as JSON")


class Run(NamedTuple):
    name: str
    dataset: str                  # "workload" or "prefix"
    serve_flags: list[str]
    kill: bool = False            # the last worker is killed during it


def serve_flags(size: int, placement_policy: str) -> list[str]:
    """`pagestream serve`'s flags for `size` workers placed by `placement_policy`: none for one worker."""
    return [] if size == 1 else ["--data-parallel-size", str(size), "--placement", placement_policy]


def plan(args: argparse.Namespace) -> list[Run]:
    """The runs in order."""
    n = args.data_parallel_size

    def workers(placement_policy: str) -> str:          # one worker has no placement to speak of
        return f"{n} workers, {placement_policy}" if n > 1 else "1 worker"
    runs = [Run(f"(a) {args.workload}, 1 worker", "workload", []),
            Run(f"(b) {args.workload}, {workers('prefix')}", "workload", serve_flags(n, "prefix")),
            Run(f"(c) prefix, {workers('round-robin')}", "prefix", serve_flags(n, "round-robin")),
            Run(f"(d) prefix, {workers('prefix')}", "prefix", serve_flags(n, "prefix"))]
    if n > 1 and args.kill:
        runs.append(Run(f"(e) {args.workload}, w{n - 1} killed", "workload", serve_flags(n, "prefix"), kill=True))
    return runs


def by_server(runs: list[Run]) -> dict[tuple[str, ...], list[int]]:
    """serve flags -> the indices of the runs a server started with them serves, in order."""
    servers: dict[tuple[str, ...], list[int]] = {}
    for i, run_ in enumerate(runs):
        servers.setdefault(tuple(run_.serve_flags), []).append(i)
    return servers


# ---- run (e): a worker killed ------------------------------------------------------------------------------------
def worker_pid(serve_pid: int, worker: str) -> int | None:
    """The live process of serve's worker `worker` (`... services.cli service worker ... --worker-name <worker>`),
    found among serve's descendants through /proc; None if it has none now."""
    for pid in descendants(serve_pid):
        args = argv(pid)
        if "service" in args and args[args.index("service") + 1:][:1] == ["worker"] and "--worker-name" in args \
                and args[args.index("--worker-name") + 1:][:1] == [worker]:
            return pid
    return None


def killer(serve: subprocess.Popen, base_url: str, worker: str, after_s: float | None, requests: int):
    """A coroutine function for served_runs' `during`: SIGKILL to serve's worker `worker`, after_s seconds on, or
    (None) once half of the run's `requests` had their first token."""
    async def kill() -> dict:
        start = time.perf_counter()
        if after_s is None:
            await first_tokens(base_url, math.ceil(requests / 2))
        else:
            await asyncio.sleep(after_s)
        pid = worker_pid(serve.pid, worker)
        if pid is None:
            raise RuntimeError(f"run (e): serve (pid {serve.pid}) has no live worker {worker} to kill")
        os.kill(pid, signal.SIGKILL)
        at = time.perf_counter() - start
        _log(f"killed worker {worker} (pid {pid}) {at:.2f} s into the run")
        return {"killed": {"worker": worker, "pid": pid, "after_s": at}}
    return kill


async def first_tokens(base_url: str, count: int, poll_s: float = 0.02) -> None:
    """Returns once the server has given `count` more first tokens than when called: the count of its
    time-to-first-token histogram (every gateway's, merged by the one that answers; another gateway's counts
    reach it within a second, services/metrics.py's GATEWAY_STATS_EVERY_S)."""
    http = HTTPClient(base_url, None, 60)

    async def given() -> float:
        series = parse_histograms(await scrape_metrics(http), FIRST_TOKEN, label="").get("")
        return series.count if series is not None else 0.0
    try:
        start = await given()
        while await given() - start < count:
            await asyncio.sleep(poll_s)
    finally:
        http.close()


def added_latency(before: list[float | None], after: list[float | None], migrated: int) -> dict:
    """What a kill cost, from the end-to-end latencies of the same requests, in the same order, without it (before)
    and with it (after), None for a request that failed: the `migrated` largest increases (ms) taken as the moved
    requests' (their p50, p99, max), and the median increase of the rest (see the module's docstring)."""
    increases = sorted(((a - b) * 1000 for b, a in zip(before, after) if a is not None and b is not None),
                       reverse=True)
    moved, rest = increases[:migrated], increases[migrated:]
    return {"migrated": migrated, "compared": len(increases),
            "moved_p50_ms": percentile(moved, 50), "moved_p99_ms": percentile(moved, 99),
            "moved_max_ms": max(moved, default=float("nan")), "rest_median_ms": percentile(rest, 50)}


# ---- the table ---------------------------------------------------------------------------------------------------
RATIO_OF = {"(b)": "(a)", "(d)": "(c)", "(e)": "(b)"}           # each run's throughput against which


def format_table(runs: list[dict]) -> str:
    """One row a run, then what the kill of run (e) cost."""
    lines = [f"{'run':36s} {'out tok/s':>10s} {'ratio':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'E2E p50':>9s} "
             f"{'E2E p99':>9s} {'fail':>5s} {'prefix hits':>11s}  placements (requests per worker, by reason)"]
    by_letter = {run["name"][:3]: run for run in runs}
    for run in runs:
        s = run["summary"]
        base = by_letter.get(RATIO_OF.get(run["name"][:3], ""))
        ratio = f"{s['output_throughput'] / base['summary']['output_throughput']:6.3f}" if base else ""
        hits = placement.hit_rate_text(run.get("prefix_cache"))
        lines.append(f"{run['name']:36s} {s['output_throughput']:10.1f} {ratio:>6s} {s['median_ttft_ms']:9.1f} "
                     f"{s['p99_ttft_ms']:9.1f} {s['median_e2el_ms']:9.1f} {s['p99_e2el_ms']:9.1f} {s['failed']:5d} "
                     f"{hits:>11s}  {placement.placements_text(run.get('placements', {}))}")
    lines.append("ratio: output tok/s of (b) / (a), (d) / (c), (e) / (b); latencies in ms; prefix hits: of the prompt "
                 "tokens")
    killed = by_letter.get("(e)")
    if killed is not None:
        lines.append(kill_text(killed))
    return "\n".join(lines)


def kill_text(run: dict) -> str:
    killed, added = run.get("killed"), run.get("added_e2el")
    if killed is None:
        return "(e): the run ended before the kill: nothing was measured"
    head = f"(e): {killed['worker']} killed {killed['after_s']:.2f} s into the run"
    if added is None or not added["migrated"]:
        return head + "; no request moved"
    return (f"{head}; {added['migrated']} requests moved. Added end-to-end time over (b), request by request: "
            f"the {added['migrated']} largest p50 {added['moved_p50_ms']:.0f} ms, p99 {added['moved_p99_ms']:.0f} "
            f"ms, max {added['moved_max_ms']:.0f} ms; the other {added['compared'] - added['migrated']} requests' "
            f"median {added['rest_median_ms']:.0f} ms")


# ---- the command -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from loadtest.datasets import load_tokenizer, prefix_sharing_requests, workload_requests
    if args.data_parallel_size < 1:
        raise SystemExit("--data-parallel-size must be at least 1")
    if args.kill_after is not None and args.kill_after < 0:
        raise SystemExit("--kill-after must not be negative")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    try:
        requests = {"workload": workload_requests(tokenizer, args.workload, args.num_prompts, args.scale),
                    "prefix": prefix_sharing_requests(tokenizer, args.prefix_count, args.prefix_len,
                                                      args.num_prompts or 512, args.suffix_len, args.output_len)}
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for name, dataset in requests.items():
        _log(f"{name}: {len(dataset)} requests, {sum(r.prompt_len for r in dataset)} prompt and "
             f"{sum(r.output_len for r in dataset)} output tokens")
    runs = plan(args)
    results: list[dict | None] = [None] * len(runs)
    logs = server_log_dir(args, "pagestream-data-parallel-")
    # Each run's serve flags say how many workers it has, never an engine flag forwarded beside them.
    server_args = argparse.Namespace(**{**vars(args),
                                        "data_parallel_size": args.parser.get_default("data_parallel_size")})
    for number, (flags, indices) in enumerate(by_server(runs).items(), 1):
        log_path = logs / f"serve-{number}.log"
        # (serve gives each worker its GPUs from CUDA_VISIBLE_DEVICES: "0,0" is one GPU for two workers, or for one)
        workers = args.data_parallel_size if flags else 1
        proc, base_url = start_server(server_args, args.parser, log_path, list(flags), workers=workers)
        try:
            for i in indices:
                name, dataset, _, kill = runs[i]
                during = killer(proc, base_url, f"w{args.data_parallel_size - 1}", args.kill_after,
                                len(requests[dataset])) if kill else None
                (result,) = asyncio.run(served_runs(base_url, requests[dataset], [float("inf")], first_run=i + 1,
                                                    warmups=args.data_parallel_size, during=during))
                results[i] = {"name": name, "dataset": dataset, "serve_flags": list(flags),
                              "server_log": str(log_path), **result}
                if kill and "killed" in result:
                    results[i]["added_e2el"] = added_latency(results[1]["e2el_s"], result["e2el_s"],
                                                             result.get("migrated", 0))
        finally:
            stop_server(proc)
    print()
    print(format_table(results))
    if args.result_json:
        args.result_json.write_text(json.dumps(jsonable({
            "data_parallel_size": args.data_parallel_size, "workload": args.workload, "scale": args.scale,
            "prefix_dataset": {"prefix_count": args.prefix_count, "prefix_len": args.prefix_len,
                               "suffix_len": args.suffix_len, "output_len": args.output_len},
            "runs": [dict(r, hops=[asdict(h) for h in r["hops"]]) for r in results]}), indent=1))
    return 0 if all(r["summary"]["failed"] == 0 for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    from engine.config import add_engine_args
    # resolve: should the engine's flags come to have a --data-parallel-size, this command's own replaces it
    parser = argparse.ArgumentParser(prog="python -m loadtest.data_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    add_engine_args(parser)
    add_arguments(parser)
    parser.set_defaults(parser=parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
