"""The serving benchmark against the real stack (`pagestream serve`, the default model): a 64-request run
completes, its token counts are the server's own (checked against the gateway's Prometheus counters, which count
independently of the responses), and the result JSON holds every metric."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

from loadtest import placement
from test_loadtest_serve import REPO


TIMERS = ("time_to_first_token_seconds_sum", "time_to_first_token_seconds_count", "e2e_request_latency_seconds_sum",
          "e2e_request_latency_seconds_count")


def counter(stack, name: str) -> float:
    request = urllib.request.Request(f"{stack.base_url}/metrics", headers={"Authorization": f"Bearer {stack.api_key}"})
    with urllib.request.urlopen(request) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


def bench(stack, tmp_path, *args: str) -> dict:
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "loadtest", "--base-url", stack.base_url, "--api-key",
                           stack.api_key, "--disable-tqdm", "--result-json", str(result), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    return json.loads(result.read_text())


def test_64_requests_against_pagestream_serve(serve_stack, tmp_path):
    generated = counter(serve_stack, "pagestream_generation_tokens_total")
    prompted = counter(serve_stack, "pagestream_prompt_tokens_total")
    server_clock = {k: counter(serve_stack, f"pagestream_{k}") for k in TIMERS}
    data = bench(serve_stack, tmp_path, "--num-prompts", "64", "--random-input-len", "32", "--random-output-len",
                 "16", "--ignore-eos", "--num-warmups", "0", "--slo", "ttft:60000", "tpot:10000")
    assert data["model"] == "smollm2-135m-instruct"                    # asked of GET /v1/models
    (run,) = data["runs"]
    s = run["summary"]
    assert s["completed"] == 64 and s["failed"] == 0, s["errors"]
    # Every count is the server's: per request from its usage, in total equal to what the gateway counted.
    assert s["output_tokens_from"] == {"usage": 64}
    assert all(r["output_tokens"] == r["usage_completion_tokens"] == 16 for r in run["requests"])
    assert s["total_output_tokens"] == 64 * 16 == counter(serve_stack, "pagestream_generation_tokens_total") - generated
    assert s["total_input_tokens"] == counter(serve_stack, "pagestream_prompt_tokens_total") - prompted
    # The prompts are as long as drawn, by the model's tokenizer and by the server's.
    assert all(r["prompt_len"] == r["usage_prompt_tokens"] == 32 for r in run["requests"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99", "max"):
            assert s[f"{stat}_{name}_ms"] > 0, (stat, name)
    for key in ("duration_s", "request_throughput", "output_throughput", "total_token_throughput", "goodput",
                "mean_concurrency"):
        assert s[key] > 0, key
    assert s["median_ttft_ms"] <= s["p99_ttft_ms"] <= s["max_ttft_ms"]
    assert s["output_throughput"] == s["total_output_tokens"] / s["duration_s"]
    for r in run["requests"]:
        assert r["ttft_ms"] <= r["e2el_ms"] and len(r["itl_ms"]) == r["chunks"] - 1 and r["chunks"] >= 1
    # The gateway times each request from inside (its own TTFT and end-to-end histograms): the harness, timing
    # from outside, must see a little more, never less; the difference is HTTP, connecting and reading.
    served = {k: counter(serve_stack, f"pagestream_{k}") - v for k, v in server_clock.items()}
    assert served["time_to_first_token_seconds_count"] == served["e2e_request_latency_seconds_count"] == 64
    for ours, theirs in (("mean_ttft_ms", "time_to_first_token_seconds"),
                         ("mean_e2el_ms", "e2e_request_latency_seconds")):
        inside = served[f"{theirs}_sum"] / 64 * 1000
        print(f"{ours}: harness {s[ours]:.1f} ms, gateway {inside:.1f} ms")
        # The upper bound is loose: harness and server share two cores, and with 64 requests sent at once the
        # harness's own connecting and reading stretch under contention (250 ms seen on a loaded CI machine).
        # It still catches a clock started too early or stopped too late by a whole stage.
        assert inside <= s[ours] < inside * 1.1 + 500


def test_chat_against_pagestream_serve(serve_stack, tmp_path):
    generated = counter(serve_stack, "pagestream_generation_tokens_total")
    data = bench(serve_stack, tmp_path, "--endpoint", "/v1/chat/completions", "--num-prompts", "16",
                 "--random-input-len", "24", "--random-output-len", "12", "--ignore-eos", "--request-rate", "20",
                 "--burstiness", "0.5", "--max-concurrency", "8", "--num-warmups", "0")
    s = data["runs"][0]["summary"]
    assert s["completed"] == 16
    assert s["total_output_tokens"] == 16 * 12 == counter(serve_stack, "pagestream_generation_tokens_total") - generated


def test_prefix_dataset_reports_the_servers_prefix_cache(serve_stack, tmp_path):
    """One request at a time, so each request after its prefix's first finds the prefix in the cache: exactly its
    64 tokens (the prefix is 4 whole blocks, the newline after it starts the fifth, which the question fills)."""
    names = (placement.QUERIES, placement.HITS, placement.PLACED)
    time.sleep(placement.SETTLE_S)                      # the scheduler's counters caught up with earlier tests
    before = {name: counter(serve_stack, name) for name in names}
    data = bench(serve_stack, tmp_path, "--dataset", "prefix", "--prefix-count", "2", "--prefix-len", "64",
                 "--suffix-len", "8", "--random-output-len", "4", "--num-prompts", "8", "--max-concurrency", "1",
                 "--num-warmups", "0", "--ignore-eos", "--seed", "11")
    time.sleep(placement.SETTLE_S)
    served = {name: counter(serve_stack, name) - before[name] for name in names}
    (run,) = data["runs"]
    assert run["summary"]["completed"] == 8
    assert run["prefix_cache"]["queries"] == served[placement.QUERIES] == run["summary"]["total_input_tokens"]
    assert run["prefix_cache"]["hits"] == served[placement.HITS] == (8 - 2) * 64
    assert run["prefix_cache"]["hit_rate"] == (8 - 2) * 64 / run["prefix_cache"]["queries"]
    # Placements as the server counted them (none from a server that does not count them).
    assert sum(sum(reasons.values()) for reasons in run.get("placements", {}).values()) == served[placement.PLACED]
