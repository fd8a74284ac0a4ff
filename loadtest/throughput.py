"""Offline throughput on a fixed workload, and a peer measured on the same prompts in the same run.

    pagestream bench throughput --workload w256 --num-prompts 64 --scale 0.25 --peer hf      (CPU, default model)
    pagestream bench throughput --workload w256 --model llama-3-8b --load-format dummy       (GPU)

The workloads (loadtest/workloads/*.json, copies of the project's fixed benchmark specs) say how to draw each
request's prompt and output length with Python's random.Random(seed); every request generates exactly its output
length (EOS ignored). --scale multiplies both length ranges, to fit the workload's shape to a small machine.
The peer is Hugging Face transformers' generate() in left-padded static batches on the same weights, as
shared/peers/hf_peer.py runs it; both figures count the workload's requested output tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

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


def run_engine(llm, requests, temperature: float) -> float:
    from engine.sampling_params import SamplingParams
    params = [SamplingParams(max_tokens=ol, min_tokens=ol, ignore_eos=True, temperature=temperature, seed=i)
              for i, (_, ol) in enumerate(requests)]
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4, ignore_eos=True))     # warm-up
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(ol for _, ol in requests)
    assert produced == expected, f"engine produced {produced} tokens, the workload asks {expected}"
    return elapsed


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
    parser.add_argument("--peer", choices=["none", "hf"], default="none",
                        help="also time transformers generate() on the same prompts and weights")
    parser.add_argument("--peer-batch-size", type=int, default=64)
    parser.add_argument("--result-json", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from services.cli import engine_kwargs

    spec = load_workload(args.workload)
    llm = LLM(progress=False, **engine_kwargs(args))
    runner = llm.engine.runner
    requests = draw_requests(spec, runner.args.vocab_size, args.num_prompts, args.scale)
    n_in, n_out = sum(len(p) for p, _ in requests), sum(o for _, o in requests)
    print(f"workload {spec['name']} x{len(requests)} (scale {args.scale}): {n_in} input, {n_out} output tokens; "
          f"model {llm.engine.model_name} on {runner.device} {str(runner.dtype).removeprefix('torch.')}", flush=True)

    rows = [("pagestream", run_engine(llm, requests, args.temperature))]
    print(f"  pagestream: {rows[0][1]:.2f} s", flush=True)
    if args.peer == "hf":
        from engine.model_files import resolve_model
        files = resolve_model(args.model, args.load_format)
        if files.path is None:
            raise SystemExit("--peer hf needs real weights (not --load-format dummy): use shared/peers/hf_peer.py")
        del llm
        seconds = run_hf_peer(files.path, requests, args.peer_batch_size, str(runner.device), runner.dtype)
        rows.append((f"transformers generate (static, batch {args.peer_batch_size})", seconds))
        print(f"  peer: {seconds:.2f} s", flush=True)

    results = []
    print(f"\n{'engine':48s} {'seconds':>8s} {'req/s':>8s} {'out tok/s':>10s} {'total tok/s':>11s} {'vs peer':>8s}")
    base = rows[-1][1]
    for name, seconds in rows:
        r = {"engine": name, "workload": spec["name"], "num_prompts": len(requests), "scale": args.scale,
             "seconds": round(seconds, 3), "requests_per_s": round(len(requests) / seconds, 3),
             "output_tok_per_s": round(n_out / seconds, 1), "total_tok_per_s": round((n_in + n_out) / seconds, 1)}
        results.append(r)
        print(f"{name:48s} {seconds:8.2f} {r['requests_per_s']:8.2f} {r['output_tok_per_s']:10.1f} "
              f"{r['total_tok_per_s']:11.1f} {base / seconds:7.2f}x")
    if args.result_json:
        args.result_json.write_text(json.dumps(results, indent=2))
    return 0
