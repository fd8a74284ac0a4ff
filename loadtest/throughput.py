"""Offline throughput on a fixed workload, and a peer measured on the same prompts in the same run.

    pagestream bench throughput --workload w256 --num-prompts 64 --scale 0.25 --peer hf      (CPU, default model)
    pagestream bench throughput --workload w256 --model llama-3-8b --load-format dummy --ablation   (GPU)
    pagestream bench latency --input-len 512 --output-len 128 --model llama-3-8b --load-format dummy
    pagestream bench throughput --workload w256 --model llama-3-8b --load-format dummy \
        --tokenizer smollm2-135m-instruct --json-schema loadtest/schemas/bench.json        (GPU: with and without)

The workloads (loadtest/workloads/*.json, copies of the project's fixed benchmark specs) say how to draw each
request's prompt and output length with Python's random.Random(seed); every request generates exactly its output
length (EOS ignored). --scale multiplies both length ranges, to fit the workload's shape to a small machine.
The peer is Hugging Face transformers' generate() in left-padded static batches on the same weights, as
shared/peers/hf_peer.py runs it; both figures count the workload's requested output tokens. On the GPU the
report adds the fraction of wall time the GPU was busy (CUDA events around every step), overall and once every
prompt is in (decode), and --ablation runs the workload again with multi-step scheduling and asynchronous output
switched off and on (the same loaded engine, flags flipped between runs). --json-schema FILE runs it once more
with that JSON schema on every request (structured outputs: a matcher per sequence, the token bitmask in the
sampler), on the same engine, and reports it against the run without. The lengths stay the workload's (EOS is
ignored): a completion whose JSON is complete before its length allows only EOS from then on, which costs less
than a running matcher, so the report says how many completed; a schema without bounds on its arrays or strings
keeps every matcher running to the end (loadtest/schemas/bench.json). Dummy weights need --tokenizer for it.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from engine.step_timing import tally

WORKLOADS = Path(__file__).parent / "workloads"


def load_workload(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.exists():
        path = WORKLOADS / f"{name_or_path}.json"
    if not path.exists():
        choices = ", ".join(p.stem for p in sorted(WORKLOADS.glob("*.json")))
        raise SystemExit(f"unknown workload {name_or_path!r}; choose from {choices} or give a JSON file")
    return json.loads(path.read_text())


def draw_requests(spec: dict, vocab_size: int, num_prompts: int | None = None,
                  scale: float = 1.0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, drawn exactly as the workload's generator says; with
    scale != 1 both lengths are scaled after drawing, so the draws stay aligned with the spec."""
    rng = random.Random(spec["seed"])
    requests = []
    for _ in range(spec["num_requests"]):
        il, ol = rng.randint(*spec["input_len"]), rng.randint(*spec["output_len"])
        prompt = [rng.randrange(1000, vocab_size - 1000) for _ in range(il)]
        if scale != 1.0:
            il, ol = max(1, round(il * scale)), max(1, round(ol * scale))
        requests.append((prompt[:il], ol))
    return requests[:num_prompts] if num_prompts else requests


@dataclass
class EngineRun:
    seconds: float
    mean_tpot_s: float                 # per request: (finish - first token) / (output tokens - 1), averaged
    gpu_busy: float | None             # GPU time / wall time, every step
    gpu_busy_decode: float | None      # the same, after the last prefill step
    gpu_split: dict | None = None      # GPU seconds and step counts: eager (prefill/mixed) and decode steps, plans
    json_complete: int | None = None   # with a JSON schema: completions whose JSON was complete at the end
    host_stalls: dict | None = None    # what stalled the host during the run (engine/host_stalls.py)


def run_engine(llm, requests, temperature: float, structured_outputs=None) -> EngineRun:
    from engine.host_stalls import HostStalls
    from engine.warmup import warm_up
    from schemas.sampling_params import SamplingParams
    params = [SamplingParams(max_tokens=ol, min_tokens=ol, ignore_eos=True, temperature=temperature, seed=i,
                             structured_outputs=structured_outputs)
              for i, (_, ol) in enumerate(requests)]
    # The server's warm-up: it compiles the Triton kernels for the shapes the run meets (prefill tiles, mixed and
    # decode steps) before the clock starts, as a server has done before its first request.
    engine = llm.engine
    warm_up(engine.runner, engine.config.scheduler, engine.max_model_len, engine.scheduler.eos_token_ids)
    runner = engine.runner
    llm.engine.scheduler.block_manager.reset_prefix_cache()    # no run may reuse an earlier run's prompts
    runner.measure_gpu_time()
    with HostStalls() as stalls:
        start = time.perf_counter()
        outputs = llm.generate([p for p, _ in requests], params)
        elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(ol for _, ol in requests)
    assert produced == expected, f"engine produced {produced} tokens, the workload asks {expected}"
    tpots = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
             for o in outputs if len(o.outputs[0].token_ids) > 1]
    busy = busy_decode = split = None
    if runner.step_timers is not None:
        busy, busy_decode, split = gpu_busy(runner.step_timers, start, start + elapsed)
    runner.measure_gpu_time(False)
    run = EngineRun(elapsed, statistics.fmean(tpots), busy, busy_decode, split, host_stalls=stalls.figures())
    print(f"  {stalls.text()}", flush=True)
    if structured_outputs is not None:
        run.json_complete = sum(_parses(o.outputs[0].text) for o in outputs)
    return run


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def gpu_busy(timers, start: float, end: float) -> tuple[float, float, dict]:
    """(busy over the whole run, busy from the last prefill step on, where the GPU time went): GPU time of the
    steps / wall time; the GPU seconds and counts of eager (prefill or mixed) and decode steps, and the plans and
    the GPU's idle before their first steps (engine/step_timing.py: what plan boundaries cost)."""
    import torch
    torch.cuda.synchronize()
    whole, _ = tally(timers)
    last_eager = max((i for i, t in enumerate(timers) if t.eager), default=-1)
    decode = timers[last_eager + 1:]
    busy = whole.gpu_s / (end - start)
    busy_decode = tally(decode)[0].gpu_s / (end - decode[0].launched) if decode else 0.0
    split = {"eager": {"gpu_s": round(whole.eager.gpu_s, 3), "steps": whole.eager.steps},
             "decode": {"gpu_s": round(whole.decode.gpu_s, 3), "steps": whole.decode.steps},
             "plans": {"count": whole.plans, "gpu_idle_before_s": round(whole.idle_before_plans_s, 3)}}
    return busy, busy_decode, split


def run_hf_peer(model_dir: Path, requests, batch_size: int, device: str, dtype) -> float:
    """transformers generate(), left-padded static batches; each batch runs to its longest output."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        group = requests[i:i + batch_size]
        width, new = max(len(p) for p, _ in group), max(o for _, o in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(group):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="w256", help="w256, w1000, or a workload JSON file")
    parser.add_argument("--num-prompts", type=int, default=None, help="the first N requests (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply input and output lengths")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the peers run")
    parser.add_argument("--ablation", action="store_true",
                        help="also run {single-step, sync output}, {multi-step}, {async output}, {both}")
    parser.add_argument("--peer", choices=["none", "hf"], default="none",
                        help="also time transformers generate() on the same prompts and weights")
    parser.add_argument("--peer-batch-size", type=int, default=64, help="the peer's static batch size")
    parser.add_argument("--result-json", type=Path, default=None, help="also write the results here, as JSON")
    parser.add_argument("--json-schema", type=Path, default=None,
                        help="also run the workload with this JSON schema (a file) on every request, and compare")


def run(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.config import engine_kwargs

    spec = load_workload(args.workload)
    llm = LLM(progress=False, **engine_kwargs(args))
    runner = llm.engine.runner
    requests = draw_requests(spec, runner.args.vocab_size, args.num_prompts, args.scale)
    n_in, n_out = sum(len(p) for p, _ in requests), sum(o for _, o in requests)
    print(f"workload {spec['name']} x{len(requests)} (scale {args.scale}): {n_in} input, {n_out} output tokens; "
          f"model {llm.engine.model_name} on {runner.device} {str(runner.dtype).removeprefix('torch.')}, "
          f"{runner.num_blocks} KV blocks", flush=True)

    steps = llm.engine.scheduler.config.num_scheduler_steps
    runs = [(f"pagestream (k={steps}, async output {'on' if runner.async_output else 'off'})",
             run_engine(llm, requests, args.temperature))]
    if args.json_schema:
        from schemas.structured_outputs import StructuredOutputsParams
        schema = StructuredOutputsParams(json=json.loads(args.json_schema.read_text()))
        llm.engine.input_processor.grammars.compile(schema)        # a schema that does not compile stops here
        runs.append((f"pagestream, JSON schema on every request (k={steps})",
                     run_engine(llm, requests, args.temperature, schema)))
    if args.ablation:
        multi = max(steps, 8)
        for name, k, asynchronous in (("single-step, sync output", 1, False), ("multi-step", multi, False),
                                      ("async output", 1, True), ("both", multi, True)):
            llm.engine.scheduler.config.num_scheduler_steps = k
            runner.async_output = asynchronous
            runs.append((f"  ablation: {name} (k={k})", run_engine(llm, requests, args.temperature)))
            print(f"  {runs[-1][0]}: {runs[-1][1].seconds:.2f} s", flush=True)
    if args.peer == "hf":
        from engine.model_files import resolve_model
        files = resolve_model(args.model, args.load_format)
        if files.path is None:
            raise SystemExit("--peer hf needs real weights (not --load-format dummy): use shared/peers/hf_peer.py")
        device, dtype = str(runner.device), runner.dtype
        del llm, runner
        seconds = run_hf_peer(files.path, requests, args.peer_batch_size, device, dtype)
        runs.append((f"transformers generate (static, batch {args.peer_batch_size})", EngineRun(seconds, 0, None, None)))

    results = []
    print(f"\n{'engine':48s} {'seconds':>8s} {'req/s':>7s} {'out tok/s':>10s} {'total tok/s':>11s} "
          f"{'TPOT ms':>8s} {'GPU busy':>9s} {'(decode)':>9s} {'vs last':>8s}")
    base = runs[-1][1].seconds
    for name, r in runs:
        row = {"engine": name.strip(), "workload": spec["name"], "num_prompts": len(requests), "scale": args.scale,
               "seconds": round(r.seconds, 3), "requests_per_s": round(len(requests) / r.seconds, 3),
               "output_tok_per_s": round(n_out / r.seconds, 1), "total_tok_per_s": round((n_in + n_out) / r.seconds, 1),
               "mean_tpot_ms": round(r.mean_tpot_s * 1000, 2), "gpu_busy": r.gpu_busy, "gpu_busy_decode": r.gpu_busy_decode,
               "gpu_split": r.gpu_split, "host_stalls": r.host_stalls}
        results.append(row)
        busy = f"{r.gpu_busy:9.1%} {r.gpu_busy_decode:9.1%}" if r.gpu_busy is not None else f"{'-':>9s} {'-':>9s}"
        print(f"{name:48s} {r.seconds:8.2f} {row['requests_per_s']:7.2f} {row['output_tok_per_s']:10.1f} "
              f"{row['total_tok_per_s']:11.1f} {row['mean_tpot_ms']:8.2f} {busy} {base / r.seconds:7.2f}x")
    for name, r in runs:
        if r.gpu_split:
            e, d = r.gpu_split["eager"], r.gpu_split["decode"]
            p = r.gpu_split["plans"]
            print(f"GPU time, {name.strip()}: prefill/mixed steps {e['gpu_s']:.2f} s in {e['steps']}, "
                  f"decode steps {d['gpu_s']:.2f} s in {d['steps']} "
                  f"({1000 * d['gpu_s'] / max(1, d['steps']):.2f} ms each); {p['count']} plans, the GPU idle "
                  f"{1000 * p['gpu_idle_before_s']:.0f} ms before their first steps")
    if args.json_schema:
        free, constrained = runs[0][1], runs[1][1]
        print(f"JSON schema on every request: {n_out / constrained.seconds:.1f} out tok/s against "
              f"{n_out / free.seconds:.1f} without ({free.seconds / constrained.seconds:.3f}x); "
              f"{constrained.json_complete} of {len(requests)} completions ended their JSON before their length")
        results[1]["json_complete"] = constrained.json_complete
    if args.result_json:
        args.result_json.write_text(json.dumps(results, indent=2))
    return 0


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")


def run_latency(args: argparse.Namespace) -> int:
    """Batch-1 decode: the median time per output token after the first, over repeated single requests."""
    from engine.llm import LLM
    from engine.config import engine_kwargs
    from schemas.sampling_params import SamplingParams

    llm = LLM(progress=False, **engine_kwargs(args))
    rng = random.Random(0)
    vocab = llm.engine.runner.args.vocab_size
    params = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True, temperature=0)
    per_token, ttfts = [], []
    for i in range(args.repeats + 1):
        prompt = [rng.randrange(1000, vocab - 1000) for _ in range(args.input_len)]
        out = llm.generate([prompt], params)[0]
        if i == 0:
            continue                                            # warm-up
        m = out.metrics
        ttfts.append(m.first_token_time - m.arrival_time)
        per_token.append((m.finished_time - m.first_token_time) / (args.output_len - 1))
    steps = llm.engine.scheduler.config.num_scheduler_steps
    print(f"batch 1, {args.input_len}-token prompt, {args.output_len} tokens, k={steps}: "
          f"{statistics.median(per_token) * 1000:.2f} ms per output token (median of {args.repeats}), "
          f"TTFT {statistics.median(ttfts) * 1000:.1f} ms")
    return 0
