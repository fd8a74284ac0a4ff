"""`pagestream bench pipeline` on the CPU with the default model: the same requests offline (an engine in a child
process) and served (a `pagestream serve` it starts, with a real redis-server), one table, the hop breakdown of
every served run, what stalled the offline engine's host (engine/host_stalls.py), and the served worker's step
statistics (PAGESTREAM_STEP_STATS) with its own host stalls."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUM = 6


def test_offline_and_served_in_one_table(tmp_path):
    result = tmp_path / "pipeline.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "pipeline", "--workload", "w256",
                           "--num-prompts", str(NUM), "--scale", "0.05", "--rates", "inf,4", "--runs", "1",
                           "--tokenizers", "1", "--detokenizers", "1", "--result-json", str(result),
                           "--server-logs", str(tmp_path / "logs")],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PAGESTREAM_STEP_STATS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(result.read_text())
    offline, served = figures["offline"], figures["served"]
    assert [r["rate"] for r in offline] == [r["rate"] for r in served] == ["inf", 4.0]
    for off, srv in zip(offline, served):
        for run in (off, srv):
            s = run["summary"]
            assert s["completed"] == NUM and s["failed"] == 0
            assert s["median_ttft_ms"] > 0 and s["median_tpot_ms"] > 0
        # EOS ignored: both made every token the workload asks, offline counted by the engine, served by usage
        assert off["summary"]["total_output_tokens"] == srv["summary"]["total_output_tokens"]
        assert off["summary"]["output_tokens_from"] == {"engine": NUM}
        assert srv["summary"]["output_tokens_from"] == {"usage": NUM}
        # The offline engine's host stalls: the collector's passes at least counted, nothing compiled on the CPU
        stalls = off["host_stalls"]
        assert stalls["compiled"] == [] and len(stalls["gc_passes"]) == 3 and len(stalls["gc_s"]) == 3
        # Every served run's first token, hop by hop, from the server's histograms
        hops = {(h["kind"], h["hop"]): h for h in srv["hops"]}
        assert hops[("first token", "gpu_step")]["count"] == NUM
        assert hops[("first token", "admission_wait")]["count"] == NUM
        # And each process of the stack, by role, with its share of a core during the run (the bench: client)
        cpu = srv["cpu"]
        roles = {"client", "gateway", "tokenizer", "scheduler", "worker", "publisher", "detokenizer", "redis-server"}
        assert roles <= set(cpu) and all(0 <= s <= os.cpu_count() for v in cpu.values() for s in v), cpu
        assert len(cpu["tokenizer"]) == len(cpu["detokenizer"]) == 1 and max(cpu["worker"]) > 0.05, cpu
    # The table: a row a run, the served ones with served / offline as the JSON's throughputs give it
    rows = {m.group(1): line for line in proc.stdout.splitlines() if (m := re.match(r"(\w+ rate \S+ #1)", line))}
    assert list(rows) == ["offline rate inf #1", "offline rate 4 #1", "served rate inf #1", "served rate 4 #1"]
    for rate, off, srv in zip(("inf", "4"), offline, served):
        ratio = srv["summary"]["output_throughput"] / off["summary"]["output_throughput"]
        assert f"{ratio:10.3f}" in rows[f"served rate {rate} #1"]
    assert proc.stdout.count("(server's histograms; first-token hops add up to its time to first token)") == 2
    assert re.search(r"  rate inf: client [\d.]+; gateway [\d.]+; tokenizer [\d.]+; scheduler [\d.]+; worker ",
                     proc.stdout)
    assert "offline, rate inf: host stalls: Triton compiled nothing; garbage collector:" in proc.stdout
    # The served worker's model loop, window by window, printed before the table, with its collector's passes
    step_stats = [line for line in proc.stdout.splitlines() if "step stats:" in line]
    assert step_stats and all(re.search(r"garbage collector \d+ passes [\d.]+ ms, 0 kernels compiled$", line)
                              for line in step_stats), step_stats
    assert Path(figures["server_log"]).parent == tmp_path / "logs" and Path(figures["server_log"]).stat().st_size


@pytest.mark.parametrize("bad", [["--rates", "0"], ["--rates", "fast"]])
def test_bad_rates_stop_before_anything_starts(bad):
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "pipeline", *bad], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--sweep" not in proc.stderr and "rate" in proc.stderr
