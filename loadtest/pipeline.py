"""The pipeline's cost in one command: the same checkpoint and requests, offline and served, in one table.

    pagestream bench pipeline --model llama-3-8b --load-format dummy --tokenizer smollm2-135m-instruct   (GPU)
    pagestream bench pipeline --workload w256 --num-prompts 32 --scale 0.1 --rates inf,4                (CPU)

Offline is the engine in-process (LLMEngine in a child process: no Redis, no HTTP), each request added the
moment it is due and timed from when its tokens reach the host; served is `pagestream serve` started here with
the same engine flags, loaded by `bench serve`'s client. Both get the fixed workload's requests (as text,
through the model's tokenizer), at each rate of --rates (inf: all at once; the inf runs are repeated --runs
times), with the same arrival times, after the same warm-up (engine/warmup.py). Every run is a cold one: its
prompts start with the run's number, so none is found in the prefix cache a run before left. The offline child
exits, giving its GPU memory back, before the server starts.

The table: throughput, served / offline (the pipeline's cost is 1 minus it), TTFT, TPOT and ITL percentiles;
then, per served run, where the time went, hop by hop (loadtest/hops.py), and how busy each of the stack's
processes was (loadtest/processes.py: a role at a whole core is what to scale out). With
PAGESTREAM_STEP_STATS=<seconds> in the environment, the served worker also logs where its model loop's time went,
window by window (services/step_stats.py: GPU busy, GPU idle before each kind of step, plans cut or skipped, waits
for plans), printed before the table; the offline child prints its GPU busy per run and what stalled its host
(engine/host_stalls.py: Triton compilations by kernel, the garbage collector's passes, CUDA's allocators growing).
A served worker logs a warning for every kernel it compiles after its warm-up.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from engine.collector import frozen_heap
from loadtest import placement
from loadtest.client import HTTPClient, OpenAIStreamClient, RequestOutput
from loadtest.hops import breakdown, format_breakdown
from loadtest.metrics import summarize
from loadtest.processes import CpuShares, format_shares
from loadtest.serve import arrival_offsets, jsonable, run_load, scrape_settled
from schemas.sampling_params import SamplingParams
from services.step_stats import PREFIX as STEP_STATS

PERCENTILES = (50, 90, 99)
SERVER_READY_S = 900               # loading 16 GB of weights, warming up, capturing CUDA graphs: minutes at most


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline benchmark")
    group.add_argument("--workload", default="w256", help="w256, w1000, or a workload JSON file")
    group.add_argument("--num-prompts", type=int, default=None, help="the first N requests (default: all)")
    group.add_argument("--scale", type=float, default=1.0, help="multiply input and output lengths")
    group.add_argument("--rates", default="inf,16", help="request rates, comma-separated (inf: all at once)")
    group.add_argument("--runs", type=int, default=3, help="how many times each all-at-once run is repeated")
    add_server_arguments(group)
    group.add_argument("--result-json", type=Path, default=None, help="also write the results here, as JSON")


def add_server_arguments(group) -> None:
    """The served pipeline's processes, as start_server starts them."""
    group.add_argument("--tokenizers", type=int, default=4, help="the served pipeline's tokenizer processes")
    group.add_argument("--detokenizers", type=int, default=2, help="the served pipeline's detokenizer processes")
    group.add_argument("--gateways", type=int, default=1, help="the served pipeline's gateway processes")
    group.add_argument("--server-logs", type=Path, default=None,
                       help="a directory for the served stack's logs (default: a new temporary one), e.g. one "
                            "that is kept when the benchmark is cut short")


def server_log_dir(args: argparse.Namespace, prefix: str) -> Path:
    """Where this run's server logs go: --server-logs (made if missing), else a new temporary directory."""
    if args.server_logs is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    args.server_logs.mkdir(parents=True, exist_ok=True)
    return args.server_logs


def schedule(args: argparse.Namespace) -> list[float]:
    from loadtest.serve import parse_rates
    rates = parse_rates(args.rates, "--rates")
    return [r for r in rates for _ in range(args.runs if math.isinf(r) else 1)]


def for_run(requests: list, run: int) -> list:
    """The requests of run `run` (1, 2, ...): each prompt starts with the run's number, so no run finds an
    earlier run's prompts in the prefix cache and every run, offline or served, is a cold one, as a fresh
    workload would be (prompt_len stays the dataset's: the tables count the tokens the engine reports)."""
    return [replace(r, prompt=f"{run}: {r.prompt}") for r in requests]


# ---- offline ----------------------------------------------------------------------------------------------------
def offline_load(engine, requests, rate: float, seed: int = 0) -> tuple[list[RequestOutput], float, dict]:
    """Every request added to the engine (LLMEngine, in this process) when it is due, and timed from its
    metrics as bench serve's client times a stream: arrival, the time each token reached the host. A request
    that comes due during a plan of k steps ends it at the next step boundary, as a served one does. Returns
    the outputs, the duration and where the GPU time went (loadtest.throughput.gpu_busy)."""
    from loadtest.throughput import gpu_busy
    offsets = arrival_offsets(len(requests), rate, 1.0, seed)
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0) for r in requests]
    runner = engine.runner
    runner.measure_gpu_time()
    start = time.monotonic()
    queue = list(range(len(requests)))[::-1]                   # next due at the end
    finished = {}

    def due() -> bool:
        return bool(queue) and time.monotonic() >= start + offsets[queue[-1]]

    with frozen_heap():                                        # as the worker's model loop
        while queue or engine.has_unfinished_requests():
            arrived = []
            while due():
                arrived.append(queue.pop())
            if arrived:    # together, as a tokenizer service takes what it reads: one tokenizer call for all
                engine.add_requests([f"offline-{i}" for i in arrived], [requests[i].prompt for i in arrived],
                                    [params[i] for i in arrived])
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, start + offsets[queue[-1]] - time.monotonic()))
                continue
            for out in engine.step(stream=False, should_stop=due):
                finished[int(out.request_id.split("-")[1])] = out
    end = time.monotonic()
    busy = None
    if runner.step_timers is not None:
        whole, decode, split = gpu_busy(runner.step_timers, start, end)
        busy = {"gpu_busy": whole, "gpu_busy_decode": decode, "split": split}
    runner.measure_gpu_time(False)
    outputs = []
    for i, request in enumerate(requests):
        m, completion = finished[i].metrics, finished[i].outputs[0]
        times = m.token_times
        outputs.append(RequestOutput(
            request.prompt_len, request.output_len, success=True, start=m.arrival_time - start,
            ttft=m.first_token_time - m.arrival_time, itl=[b - a for a, b in zip(times, times[1:])],
            e2el=m.finished_time - m.arrival_time, chunks=len(times),
            usage_prompt_tokens=len(finished[i].prompt_token_ids), output_tokens=len(completion.token_ids),
            tokens_from="engine"))
    return outputs, end - start, busy


def run_offline(args: argparse.Namespace, requests, rates: list[float]) -> list[dict]:
    """The offline runs, in a child process: the engine's GPU memory is the driver's to take back when it exits,
    before the server starts (an engine released in-process can leave its pool allocated)."""
    from engine.config import engine_kwargs
    work = Path(tempfile.mkdtemp(prefix="pagestream-offline-"))
    spec = {"engine": engine_kwargs(args), "rates": rates, "requests": [asdict(r) for r in requests]}
    (work / "spec.json").write_text(json.dumps(jsonable(spec)))
    child = subprocess.run([sys.executable, "-m", "loadtest.pipeline", str(work / "spec.json"),
                            str(work / "runs.json")])
    if child.returncode != 0:
        raise SystemExit(f"the offline runs failed (exit {child.returncode})")
    runs = json.loads((work / "runs.json").read_text())
    for run in runs:
        run["rate"] = float(run["rate"])             # JSON spells inf "inf"
    return runs


def offline_child(spec_path: str, out_path: str) -> None:
    from engine.config import EngineConfig
    from engine.host_stalls import HostStalls
    from engine.llm_engine import LLMEngine
    from engine.warmup import warm_up
    from loadtest.datasets import SampleRequest
    spec = json.loads(Path(spec_path).read_text())
    requests = [SampleRequest(**r) for r in spec["requests"]]
    engine = LLMEngine(EngineConfig.from_kwargs(**spec["engine"]), progress=False)
    seconds = warm_up(engine.runner, engine.config.scheduler, engine.max_model_len, engine.scheduler.eos_token_ids)
    _log(f"offline: warmed up in {seconds:.1f} s")
    runs = []
    for run, rate in enumerate(spec["rates"], 1):
        rate = float(rate)
        with HostStalls() as stalls:
            outputs, duration, busy = offline_load(engine, for_run(requests, run), rate)
        runs.append({"mode": "offline", "rate": rate, "summary": summarize(outputs, duration, PERCENTILES),
                     "gpu": busy, "host_stalls": stalls.figures()})
        _log(f"offline, rate {rate:g}: {runs[-1]['summary']['output_throughput']:.1f} output tok/s"
             + (f", GPU busy {busy['gpu_busy']:.1%} (decode {busy['gpu_busy_decode']:.1%}), {busy['split']}"
                if busy else ""))
        _log(f"offline, rate {rate:g}: {stalls.text()}")
    Path(out_path).write_text(json.dumps(jsonable(runs)))


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- served ----------------------------------------------------------------------------------------------------
def start_server(args: argparse.Namespace, parser: argparse.ArgumentParser, log_path: Path,
                 serve_flags: list[str] = (), env: dict[str, str] | None = None, workers: int = 1):
    """`pagestream serve` with this command's engine flags and serve_flags, on free ports, with `env` over this
    process's environment, once `workers` workers serve (ready means one does); returns (process, base URL)."""
    from engine.config import engine_kwargs
    from services.launcher import forward_argv, free_port, wait_ready
    engine_flags = set(engine_kwargs(args))
    flags = forward_argv(parser, args, {a.dest for a in parser._actions} - engine_flags)
    port = free_port()
    argv = [sys.executable, "-m", "services.cli", "serve", "--port", str(port), "--grpc-port", "0",
            "--tokenizers", str(args.tokenizers), "--detokenizers", str(args.detokenizers),
            "--gateways", str(args.gateways),
            "--prefix", f"bench{os.getpid()}", *flags, *serve_flags]
    _log("served: " + " ".join(argv[2:]))
    proc = subprocess.Popen(argv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    base_url = f"http://127.0.0.1:{port}"
    if not wait_ready(base_url, SERVER_READY_S, alive=lambda: proc.poll() is None):
        stop_server(proc)
        raise SystemExit(f"the server did not get ready:\n{log_path.read_text()[-3000:]}")
    deadline = time.monotonic() + SERVER_READY_S
    while workers > 1 and live_workers(base_url) < workers:
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_server(proc)
            raise SystemExit(f"{workers} workers did not all register:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    _log(f"served: ready at {base_url}")
    return proc, base_url


def live_workers(base_url: str) -> int:
    """The workers the server's scheduler drives (pagestream_workers in /metrics; 0 before it says)."""
    import urllib.request
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as r:
        return int(placement.counters(r.read().decode()).get((placement.WORKERS, ()), 0))


def stop_server(proc: subprocess.Popen) -> None:
    import signal
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def served_runs(base_url: str, requests, rates: list[float], first_run: int = 1,
                      warmups: int = 1, during=None, server_pid: int | None = None) -> list[dict]:
    """The runs at each rate, numbered from first_run (for_run: a server serving runs of two calls needs them
    numbered apart), after `warmups` unmeasured requests sent at once. `during`: a coroutine function started with
    each run's load (the data-parallel bench's kill of a worker), cancelled if the load ends first; what it returns,
    a dict, joins the run's figures. Each run's figures hold every request's end-to-end latency in request order
    (e2el_s, None for one that failed), for comparing two runs of the same requests request by request, and, given
    the server's pid, each of its processes' share of a core during the run (cpu, by role: loadtest.processes)."""
    http = HTTPClient(base_url, None, 3600)
    try:
        model = (await http.get_json("/v1/models"))["data"][0]["id"]
        client = OpenAIStreamClient(http, "/v1/completions", model, include_usage=True, ignore_eos=True,
                                    temperature=0.0)
        warm, _, _ = await run_load(client, requests[:warmups], float("inf"))
        if failed := [o for o in warm if not o.success]:
            raise SystemExit(f"the served warm-up request failed: {failed[0].error}")
        runs = []
        for run, rate in enumerate(rates, first_run):
            before = await scrape_settled(http)
            beside = asyncio.create_task(during()) if during is not None else None
            cpu = CpuShares(server_pid) if server_pid is not None else None
            outputs, duration, _ = await run_load(client, for_run(requests, run), rate)
            shares = {"cpu": cpu.done()} if cpu is not None else {}
            extra = await _finished_or_cancelled(beside)
            after = await scrape_settled(http)
            for out in outputs:
                out.output_tokens, out.tokens_from = out.usage_completion_tokens or 0, "usage"
            runs.append({"mode": "served", "rate": rate, "summary": summarize(outputs, duration, PERCENTILES),
                         "e2el_s": [o.e2el if o.success else None for o in outputs],
                         "hops": breakdown(before, after), **placement.figures(before, after), **shares, **extra})
            _log(f"served, rate {rate:g}: {runs[-1]['summary']['output_throughput']:.1f} output tok/s")
        return runs
    finally:
        http.close()


async def _finished_or_cancelled(task: asyncio.Task | None) -> dict:
    """The task's result if it finished, else {} once it is cancelled."""
    if task is None:
        return {}
    if not task.done():
        task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return {}


# ---- the table -------------------------------------------------------------------------------------------------
def format_table(offline: list[dict], served: list[dict]) -> str:
    head = (f"{'run':22s} {'out tok/s':>10s} {'served/off':>10s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
            f"{'TPOT p50':>9s} {'ITL p50':>8s} {'ITL p99':>8s} {'fail':>5s}   (ms)")
    lines = [head]
    for mode_runs in (offline, served):
        seen: dict[float, int] = {}
        for i, run in enumerate(mode_runs):
            s, rate = run["summary"], run["rate"]
            seen[rate] = seen.get(rate, 0) + 1
            name = f"{run['mode']} rate {rate:g} #{seen[rate]}"
            ratio = ""
            if run["mode"] == "served" and i < len(offline):
                ratio = f"{s['output_throughput'] / offline[i]['summary']['output_throughput']:10.3f}"
            lines.append(f"{name:22s} {s['output_throughput']:10.1f} {ratio:>10s} {s['median_ttft_ms']:9.1f} "
                         f"{s['p99_ttft_ms']:9.1f} {s['median_tpot_ms']:9.2f} {s['median_itl_ms']:8.2f} "
                         f"{s['p99_itl_ms']:8.2f} {s['failed']:5d}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from loadtest.datasets import load_tokenizer, workload_requests
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    requests = workload_requests(tokenizer, args.workload, args.num_prompts, args.scale)
    rates = schedule(args)
    _log(f"{len(requests)} requests of {args.workload} (scale {args.scale}): "
         f"{sum(r.prompt_len for r in requests)} prompt, {sum(r.output_len for r in requests)} output tokens; "
         f"rates {', '.join(f'{r:g}' for r in rates)}")
    offline = run_offline(args, requests, rates)
    log_path = server_log_dir(args, "pagestream-bench-") / "serve.log"
    proc, base_url = start_server(args, args.parser, log_path)
    try:
        served = asyncio.run(served_runs(base_url, requests, rates, server_pid=proc.pid))
    finally:
        stop_server(proc)
    print()
    for run_ in served:
        print(format_breakdown(run_["hops"], f"served, rate {run_['rate']:g}"))
    print("served, each process's share of a core during the run, by role (the bench is the client):")
    for run_ in served:
        print(f"  rate {run_['rate']:g}: {format_shares(run_['cpu'])}")
    stats = [line for line in log_path.read_text().splitlines() if STEP_STATS in line]
    if stats:                             # the worker's model loop, window by window (PAGESTREAM_STEP_STATS)
        print("\nthe worker's model loop, served:")
        for line in stats:
            print("  " + line[11:19] + " " + line[line.index(STEP_STATS):])     # the time, of the log's asctime
    print()
    print(format_table(offline, served))
    if args.result_json:
        served = [dict(r, hops=[asdict(h) for h in r["hops"]]) for r in served]
        args.result_json.write_text(json.dumps(jsonable({"workload": args.workload, "num_prompts": len(requests),
                                                         "scale": args.scale, "offline": offline,
                                                         "served": served, "server_log": str(log_path)}),
                                               indent=1))
    return 0 if all(r["summary"]["failed"] == 0 for r in offline + served) else 1



if __name__ == "__main__":          # the offline child of run_offline: SPEC.json OUT.json
    offline_child(sys.argv[1], sys.argv[2])
