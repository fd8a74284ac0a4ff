"""`pagestream bench throughput` and `bench latency` run end to end (the default model, on the CPU, at small
sizes): the workload's requests are drawn as its spec says, every requested token is generated, the ablation runs
every configuration, and the JSON holds what the README reports."""
from __future__ import annotations

import json
import random

from loadtest.throughput import draw_requests, load_workload
from services.cli import main


def test_workload_draws_follow_the_spec():
    spec = load_workload("w256")
    requests = draw_requests(spec, 128256)
    assert len(requests) == spec["num_requests"]
    totals = spec["totals_for_llama_3_8b_vocab"]
    assert sum(len(p) for p, _ in requests) == totals["input_tokens"]
    assert sum(o for _, o in requests) == totals["output_tokens"]
    rng = random.Random(spec["seed"])                      # the first request, by the spec's generator text
    il, ol = rng.randint(*spec["input_len"]), rng.randint(*spec["output_len"])
    assert requests[0] == ([rng.randrange(1000, 128256 - 1000) for _ in range(il)], ol)


def test_bench_throughput_with_ablation(tmp_path, capsys):
    result = tmp_path / "w256.json"
    assert main(["bench", "throughput", "--workload", "w256", "--num-prompts", "6", "--scale", "0.04",
                 "--ablation", "--max-model-len", "512", "--result-json", str(result)]) == 0
    rows = json.loads(result.read_text())
    assert [r["engine"].split(" (")[0] for r in rows] == [
        "pagestream", "ablation: single-step, sync output", "ablation: multi-step", "ablation: async output",
        "ablation: both"]
    for row in rows:
        assert row["num_prompts"] == 6 and row["output_tok_per_s"] > 0 and row["mean_tpot_ms"] > 0
    assert "ablation: both" in capsys.readouterr().out


def test_bench_latency(capsys):
    assert main(["bench", "latency", "--input-len", "32", "--output-len", "8", "--repeats", "2",
                 "--max-model-len", "512"]) == 0
    assert "ms per output token" in capsys.readouterr().out
