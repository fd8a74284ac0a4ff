"""What data parallelism buys, in one command: one worker against N, and cache-blind against cache-aware placement.

    pagestream bench data-parallel --model llama-3-8b --load-format dummy --tokenizer smollm2-135m-instruct \\
        --data-parallel-size 2                                                                       (2 GPUs)
    pagestream bench data-parallel --data-parallel-size 1 --workload w256 --scale 0.05 --num-prompts 16 \\
        --prefix-count 4 --prefix-len 64 --suffix-len 16 --output-len 8                              (CPU)

Four runs, each of every request sent at once to a `pagestream serve` started here with this command's engine
flags (loadtest/pipeline.py's start_server, after its warm-up requests, one per worker):
  (a) the workload (--workload, default w1000) on one worker;
  (b) the same on --data-parallel-size N workers, placed by prompt prefix (serve's default);
  (c) the prefix dataset (loadtest/datasets.py: --prefix-count prompt prefixes of --prefix-len tokens, each
      request one of them and a question of --suffix-len tokens) on N workers, placed round-robin;
  (d) the same placed by prompt prefix.
Then one table: output tok/s, (b) / (a) and (d) / (c), TTFT p50 and p99, the prefix cache's hit rate and the
requests each worker took and why (loadtest/placement.py). Runs with the same serve flags share a server, started
once ((b) and (d) on N workers; all four with --data-parallel-size 1, which leaves the data-parallel flags out, as
a server of one worker needs none: so it runs on one GPU or the CPU). Every run's prompts start with its number,
so none finds an earlier run's in the prefix cache.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from loadtest import placement
from loadtest.pipeline import _log, add_server_arguments, served_runs, start_server, stop_server
from loadtest.serve import jsonable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data-parallel benchmark")
    group.add_argument("--data-parallel-size", type=int, default=2, help="workers of runs (b) to (d)")
    group.add_argument("--workload", default="w1000", help="runs (a) and (b): w256, w1000, or a workload JSON file")
    group.add_argument("--scale", type=float, default=1.0, help="multiply the workload's input and output lengths")
    group.add_argument("--num-prompts", type=int, default=None,
                       help="requests per run (default: all of the workload's; 512 of the prefix dataset)")
    group.add_argument("--prefix-count", type=int, default=32, help="runs (c) and (d): shared prompt prefixes")
    group.add_argument("--prefix-len", type=int, default=1000, help="tokens of each shared prefix")
    group.add_argument("--suffix-len", type=int, default=100, help="tokens of each request's own question")
    group.add_argument("--output-len", type=int, default=128, help="output tokens of each prefix-dataset request")
    add_server_arguments(group)
    group.add_argument("--result-json", type=Path, default=None, help="also write the results here, as JSON")


def serve_flags(size: int, placement_policy: str) -> list[str]:
    """`pagestream serve`'s flags for `size` workers placed by `placement_policy`: none for one worker."""
    return [] if size == 1 else ["--data-parallel-size", str(size), "--placement", placement_policy]


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """The runs in order: (name, dataset, serve flags)."""
    n = args.data_parallel_size

    def workers(placement_policy: str) -> str:          # one worker has no placement to speak of
        return f"{n} workers, {placement_policy}" if n > 1 else "1 worker"
    return [(f"(a) {args.workload}, 1 worker", "workload", []),
            (f"(b) {args.workload}, {workers('prefix')}", "workload", serve_flags(n, "prefix")),
            (f"(c) prefix, {workers('round-robin')}", "prefix", serve_flags(n, "round-robin")),
            (f"(d) prefix, {workers('prefix')}", "prefix", serve_flags(n, "prefix"))]


def by_server(runs: list[tuple[str, str, list[str]]]) -> dict[tuple[str, ...], list[int]]:
    """serve flags -> the indices of the runs a server started with them serves, in order."""
    servers: dict[tuple[str, ...], list[int]] = {}
    for i, (_, _, flags) in enumerate(runs):
        servers.setdefault(tuple(flags), []).append(i)
    return servers


def format_table(runs: list[dict]) -> str:
    """One row a run; the ratio is (b) / (a) and (d) / (c)."""
    lines = [f"{'run':36s} {'out tok/s':>10s} {'ratio':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'fail':>5s} "
             f"{'prefix hits':>11s}  placements (requests per worker, by reason)"]
    for i, run in enumerate(runs):
        s = run["summary"]
        ratio = f"{s['output_throughput'] / runs[i - 1]['summary']['output_throughput']:6.3f}" if i % 2 else ""
        hits = placement.hit_rate_text(run.get("prefix_cache"))
        lines.append(f"{run['name']:36s} {s['output_throughput']:10.1f} {ratio:>6s} {s['median_ttft_ms']:9.1f} "
                     f"{s['p99_ttft_ms']:9.1f} {s['failed']:5d} {hits:>11s}  "
                     f"{placement.placements_text(run.get('placements', {}))}")
    lines.append("ratio: output tok/s of (b) / (a), of (d) / (c); TTFT in ms; prefix hits: of the prompt tokens")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from loadtest.datasets import load_tokenizer, prefix_sharing_requests, workload_requests
    if args.data_parallel_size < 1:
        raise SystemExit("--data-parallel-size must be at least 1")
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
    logs = Path(tempfile.mkdtemp(prefix="pagestream-data-parallel-"))
    # Each run's serve flags say how many workers it has, never an engine flag forwarded beside them.
    server_args = argparse.Namespace(**{**vars(args),
                                        "data_parallel_size": args.parser.get_default("data_parallel_size")})
    for number, (flags, indices) in enumerate(by_server(runs).items(), 1):
        log_path = logs / f"serve-{number}.log"
        proc, base_url = start_server(server_args, args.parser, log_path, list(flags))
        try:
            for i in indices:
                name, dataset, _ = runs[i]
                (result,) = asyncio.run(served_runs(base_url, requests[dataset], [float("inf")], first_run=i + 1,
                                                    warmups=args.data_parallel_size))
                results[i] = {"name": name, "dataset": dataset, "serve_flags": list(flags),
                              "server_log": str(log_path), **result}
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
