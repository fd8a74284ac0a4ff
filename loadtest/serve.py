"""The serving benchmark: load any OpenAI-compatible server (this project, vLLM, SGLang) and measure it.

    pagestream bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4 \\
        --random-input-len 256 --random-output-len 64 --slo ttft:500 tpot:50 --result-json run.json --plot-dir plots
    pagestream bench serve --sweep 2,4,8,inf ...          (the same prompts at each rate)
    pagestream bench serve --dataset prefix --prefix-count 32 --prefix-len 1000 --suffix-len 100 --num-prompts 512
    python -m loadtest ...                                (the same command)

Requests arrive at --request-rate as a Poisson process (--burstiness 1), or a gamma process (burstiness < 1:
burstier, > 1: more regular; the mean rate stays the same); rate inf sends them all at once. --max-concurrency
caps the requests in flight (an arrival waits for a slot; its latencies count from when it is sent). Warm-up
requests go first and are not measured. Output tokens are counted from the server's usage (stream_options
include_usage, asked for unless --no-usage), else with the model's tokenizer. Every request's figures and the
summary go to --result-json; --plot-dir gets latency CDFs, an ITL histogram and, with --sweep, throughput and
latency against the rate. Against pagestream, each run also reports its prefix-cache hit rate and, serving with
data parallelism, how many requests went to each worker and why (loadtest/placement.py).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from engine.collector import frozen_heap
from loadtest import placement
from loadtest.client import HTTPClient, OpenAIStreamClient, RequestOutput
from loadtest.datasets import SampleRequest
from loadtest.hops import breakdown, format_breakdown
from loadtest.metrics import format_summary, parse_slo, summarize, tpot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    server.add_argument("--endpoint", default="/v1/completions", help="the API to load",
                        choices=["/v1/completions", "/v1/chat/completions"])
    server.add_argument("--model", default=None, help="the served model's name (default: the first of GET "
                                                      "/v1/models)")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as a bearer token (default: $OPENAI_API_KEY)")
    server.add_argument("--tokenizer", default=None,
                        help="counts and draws tokens: a local model directory, smollm2-135m-instruct, a .gguf, or a "
                             "hub id in the local cache (default: the model's name)")
    server.add_argument("--request-timeout", type=float, default=3600.0, help="seconds, per request")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", choices=["random", "prefix", "workload", "sharegpt", "jsonl"], default="random",
                      help="where the prompts come from")
    data.add_argument("--dataset-path", default=None, help="the ShareGPT JSON or the JSONL file")
    data.add_argument("--num-prompts", type=int, default=1000, help="requests in a run")
    data.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens (--dataset random)")
    data.add_argument("--random-output-len", type=int, default=128,
                      help="output tokens (--dataset random, prefix)")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in [L*(1-r), L*(1+r)]")
    data.add_argument("--prefix-count", type=int, default=32, help="shared prefixes (--dataset prefix)")
    data.add_argument("--prefix-len", type=int, default=1000, help="tokens of each shared prefix (--dataset prefix)")
    data.add_argument("--suffix-len", type=int, default=100,
                      help="tokens of each request's own question, after its prefix (--dataset prefix)")
    data.add_argument("--workload", default="w256", help="w256, w1000 or a workload JSON (--dataset workload)")
    data.add_argument("--scale", type=float, default=1.0, help="multiply the workload's lengths")
    data.add_argument("--output-len", type=int, default=None,
                      help="output tokens for every ShareGPT or JSONL request (default: the data's)")
    data.add_argument("--seed", type=int, default=0, help="seeds the draws of prompts and arrivals")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf: all at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrivals: 1 Poisson, <1 burstier, >1 more regular")
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    load.add_argument("--sweep", default=None, metavar="RATES",
                      help="comma-separated request rates to run one after another, e.g. 2,4,8,inf")
    load.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests sent first")
    load.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    load.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    load.add_argument("--no-usage", action="store_true",
                      help="do not ask for stream_options.include_usage; count output with the tokenizer")
    load.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request")

    out = parser.add_argument_group("results")
    out.add_argument("--slo", nargs="+", default=None, metavar="NAME:MS",
                     help="goodput bounds in ms, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    out.add_argument("--percentiles", default="50,90,99", help="latency percentiles to report")
    out.add_argument("--result-json", type=Path, default=None, help="also write the results here, as JSON")
    out.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots here")
    out.add_argument("--label", default="", help="a name for this run, in the JSON and the plots")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


# ---- arrivals --------------------------------------------------------------------------------------------------
def arrival_offsets(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """When each request is due, in seconds from the start: the first at 0, then gaps drawn from a gamma
    distribution of shape `burstiness` and mean 1/rate (shape 1 is the exponential: a Poisson process)."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("the request rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(num):
        if i:
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        offsets.append(t)
    return offsets


# ---- one run ---------------------------------------------------------------------------------------------------
async def run_load(client: OpenAIStreamClient, requests: list[SampleRequest], rate: float, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0,
                   progress: bool = False) -> tuple[list[RequestOutput], float, float]:
    """Sends every request on its schedule; returns (outputs in request order, duration, the most a request was
    sent after it was due, in seconds: how far the harness itself fell behind)."""
    from tqdm import tqdm
    offsets = arrival_offsets(len(requests), rate, burstiness, seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", dynamic_ncols=True)

    async def one(request: SampleRequest) -> RequestOutput:
        if slots is None:
            out = await client.generate(request.prompt, request.prompt_len, request.output_len)
        else:
            async with slots:
                out = await client.generate(request.prompt, request.prompt_len, request.output_len)
        bar.update(1)
        return out

    gc.collect()
    with frozen_heap():               # the client's own pauses would be counted as the server's latency
        tasks, lag = [], 0.0
        start = time.perf_counter()
        for request, due in zip(requests, offsets):
            wait = start + due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            lag = max(lag, time.perf_counter() - start - due)
            tasks.append(asyncio.create_task(one(request)))
        outputs = await asyncio.gather(*tasks)
        end = max((o.start + o.e2el for o in outputs), default=start)
        bar.close()
    for out in outputs:
        out.start -= start            # from here on, seconds since the run began
    return list(outputs), end - start, lag


def count_output_tokens(outputs: list[RequestOutput], tokenizer) -> None:
    """The server's usage where it gave one; the tokenizer on the generated text otherwise."""
    for out in outputs:
        if not out.success:
            continue
        if out.usage_completion_tokens is not None:
            out.output_tokens, out.tokens_from = out.usage_completion_tokens, "usage"
        elif tokenizer is not None:
            out.output_tokens = len(tokenizer.encode(out.text, add_special_tokens=False))
            out.tokens_from = "tokenizer"
        else:
            raise SystemExit("the server sent no usage, so output tokens need the model's tokenizer: pass "
                             "--tokenizer with a local model directory")


def request_record(out: RequestOutput) -> dict:
    record = asdict(out)
    del record["text"]
    for name in ("ttft", "e2el"):
        value = record.pop(name)
        record[f"{name}_ms"] = None if value is None else value * 1000
    record["tpot_ms"] = None if (t := tpot(out)) is None else t * 1000
    record["itl_ms"] = [x * 1000 for x in record.pop("itl")]
    record["start_s"] = record.pop("start")
    return record


def jsonable(value):
    """JSON has no inf or NaN: they are written as strings / null."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


async def scrape_metrics(http: HTTPClient) -> str:
    """The server's /metrics text, or "" if it has none (the breakdown is then empty)."""
    try:
        response = await http.send(http.request_bytes("GET", "/metrics", accept="text/plain"))
    except OSError:
        return ""
    return response.text if response.status == 200 else ""


async def scrape_settled(http: HTTPClient) -> str:
    """/metrics once the prefix-cache and placement counters (loadtest.placement) have caught up with what the
    server has done; at once from a server without them."""
    text = await scrape_metrics(http)
    if placement.counters(text):
        await asyncio.sleep(placement.SETTLE_S)
        text = await scrape_metrics(http)
    return text


def parse_rates(text: str, flag: str = "--sweep") -> list[float]:
    """Request rates separated by commas (inf: all at once), given with `flag` (named in the error)."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: give request rates separated by commas, e.g. 2,4,8,inf") from None
    if not rates or any(not r > 0 for r in rates):
        raise SystemExit(f"{flag} {text!r}: every rate must be positive")
    return rates


# ---- the command -----------------------------------------------------------------------------------------------
def load_requests(args: argparse.Namespace, tokenizer) -> list[SampleRequest]:
    from loadtest import datasets
    if args.dataset in ("random", "prefix", "workload", "sharegpt") and tokenizer is None:
        raise SystemExit(f"the {args.dataset} dataset needs the model's tokenizer: pass --tokenizer")
    if args.dataset in ("sharegpt", "jsonl") and not args.dataset_path:
        raise SystemExit(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "random":
        requests = datasets.random_requests(tokenizer, args.num_prompts, args.random_input_len,
                                            args.random_output_len, args.random_range_ratio, args.seed)
    elif args.dataset == "prefix":
        requests = datasets.prefix_sharing_requests(tokenizer, args.prefix_count, args.prefix_len, args.num_prompts,
                                                    args.suffix_len, args.random_output_len, args.seed)
    elif args.dataset == "workload":
        requests = datasets.workload_requests(tokenizer, args.workload, args.num_prompts, args.scale)
    elif args.dataset == "sharegpt":
        requests = datasets.sharegpt_requests(args.dataset_path, tokenizer, args.num_prompts, args.seed,
                                              args.output_len)
    else:
        requests = datasets.jsonl_requests(args.dataset_path, tokenizer, args.num_prompts, args.output_len)
    if len(requests) < args.num_prompts:
        print(f"the {args.dataset} dataset has {len(requests)} usable prompts; repeating them to make "
              f"{args.num_prompts}", file=sys.stderr)
        requests = datasets.cycle_to(requests, args.num_prompts)
    return requests


async def benchmark(args: argparse.Namespace) -> dict:
    from loadtest.datasets import load_tokenizer
    slo = parse_slo(args.slo)
    percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()]
    rates = parse_rates(args.sweep) if args.sweep else [args.request_rate]
    http = HTTPClient(args.base_url, args.api_key, args.request_timeout)
    try:
        model = args.model
        if model is None:
            models = (await http.get_json("/v1/models")).get("data") or []
            if not models:
                raise SystemExit(f"{args.base_url}/v1/models lists no model: pass --model")
            model = models[0]["id"]
        tokenizer = None
        name = args.tokenizer or model
        try:
            tokenizer = load_tokenizer(name)
        except ValueError as e:
            if args.tokenizer or args.dataset != "jsonl":
                raise SystemExit(str(e)) from None
        ignore_eos = args.ignore_eos
        if args.dataset == "workload" and not ignore_eos:
            from loadtest.throughput import load_workload
            if load_workload(args.workload).get("ignore_eos"):
                print("the workload generates its exact output lengths: sending ignore_eos", file=sys.stderr)
                ignore_eos = True
        if tokenizer is None and args.no_usage:
            raise SystemExit("--no-usage counts output tokens with the tokenizer: pass --tokenizer")
        requests = load_requests(args, tokenizer)
        client = OpenAIStreamClient(http, args.endpoint, model, include_usage=not args.no_usage,
                                    ignore_eos=ignore_eos, temperature=args.temperature, extra_body=args.extra_body)
        print(f"{len(requests)} {args.dataset} requests ({sum(r.prompt_len for r in requests)} prompt, "
              f"{sum(r.output_len for r in requests)} output tokens asked) -> {model} at "
              f"{args.base_url}{args.endpoint}", file=sys.stderr)

        if args.num_warmups:
            warm = [requests[i % len(requests)] for i in range(args.num_warmups)]
            outs, _, _ = await run_load(client, warm, float("inf"), max_concurrency=args.max_concurrency)
            failed = [o for o in outs if not o.success]
            if failed:
                raise SystemExit(f"warm-up request failed: {failed[0].error}")
            count_output_tokens(outs, tokenizer)      # no usage and no tokenizer: say so now, not after the run

        runs = []
        for rate in rates:
            before = await scrape_settled(http)
            outputs, duration, lag = await run_load(client, requests, rate, args.burstiness, args.max_concurrency,
                                                    args.seed, progress=not args.disable_tqdm)
            after = await scrape_settled(http)
            hops, server = breakdown(before, after), placement.figures(before, after)
            count_output_tokens(outputs, tokenizer)
            summary = summarize(outputs, duration, percentiles, slo)
            summary["max_dispatch_lag_ms"] = lag * 1000
            title = f"rate {'inf' if math.isinf(rate) else f'{rate:g}'}" + (f", {args.label}" if args.label else "")
            print(format_summary(summary, title, percentiles), flush=True)
            if server:
                print(placement.format_figures(server), flush=True)
            print(format_breakdown(hops), flush=True)
            runs.append({"request_rate": rate, "burstiness": args.burstiness,
                         "max_concurrency": args.max_concurrency, "summary": summary, **server,
                         "hops": [asdict(h) for h in hops], "requests": [request_record(o) for o in outputs]})
    finally:
        http.close()
    config = {k: v for k, v in vars(args).items() if not callable(v) and k not in ("parser",)}
    return jsonable({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "label": args.label, "base_url": args.base_url,
                     "endpoint": args.endpoint, "model": model,
                     "tokenizer": getattr(tokenizer, "name_or_path", None), "dataset": args.dataset,
                     "num_prompts": len(requests), "ignore_eos": ignore_eos, "config": config, "runs": runs})


def write_plots(result: dict, directory: Path) -> list[Path]:
    from loadtest import plots
    directory.mkdir(parents=True, exist_ok=True)
    title = ", ".join(x for x in (result.get("model"), result.get("label")) if x)
    paths = [plots.latency_cdfs(result["runs"], directory / "latency_cdf.png", title),
             plots.itl_histogram(result["runs"], directory / "itl_histogram.png", title)]
    if len(result["runs"]) > 1:
        paths.append(plots.sweep(result["runs"], directory / "sweep.png", f"Rate sweep: {title}"))
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(benchmark(args))
    except ValueError as e:                       # a user error: an SLO, a dataset file, lengths
        raise SystemExit(str(e)) from None
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=1))
        print(f"results: {args.result_json}", file=sys.stderr)
    if args.plot_dir:
        for path in write_plots(result, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    return 0 if all(r["summary"]["completed"] for r in result["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
