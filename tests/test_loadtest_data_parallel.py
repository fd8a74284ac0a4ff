"""The data-parallel benchmark (loadtest/data_parallel.py): which server each run gets, and the whole command on the
CPU with one worker, as the CPU runs it (the data-parallel serve flags are a GPU machine's)."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

from loadtest.data_parallel import by_server, plan
from test_loadtest_serve import REPO

NUM = 4


def test_runs_with_the_same_serve_flags_share_a_server():
    runs = plan(argparse.Namespace(data_parallel_size=2, workload="w1000"))
    assert [flags for _, _, flags in runs] == [
        [], ["--data-parallel-size", "2", "--placement", "prefix"],
        ["--data-parallel-size", "2", "--placement", "round-robin"],
        ["--data-parallel-size", "2", "--placement", "prefix"]]
    assert [dataset for _, dataset, _ in runs] == ["workload", "workload", "prefix", "prefix"]
    assert list(by_server(runs).values()) == [[0], [1, 3], [2]]            # three servers, (b) and (d) on one
    one = plan(argparse.Namespace(data_parallel_size=1, workload="w256"))
    assert [flags for _, _, flags in one] == [[]] * 4 and list(by_server(one).values()) == [[0, 1, 2, 3]]
    assert [name for name, _, _ in one] == ["(a) w256, 1 worker", "(b) w256, 1 worker", "(c) prefix, 1 worker",
                                            "(d) prefix, 1 worker"]


def test_the_four_runs_on_one_cpu_worker(tmp_path):
    result = tmp_path / "dp.json"
    proc = subprocess.run([sys.executable, "-m", "loadtest.data_parallel", "--data-parallel-size", "1",
                           "--workload", "w256", "--scale", "0.03", "--num-prompts", str(NUM), "--prefix-count", "2",
                           "--prefix-len", "48", "--suffix-len", "8", "--output-len", "3", "--max-model-len", "2048",
                           "--tokenizers", "1", "--detokenizers", "1", "--result-json", str(result)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    # One server, started with the engine flags given and no data-parallel flag, served all four runs.
    started = [line for line in proc.stdout.splitlines() if "served: services.cli serve" in line]
    assert len(started) == 1 and "--max-model-len 2048" in started[0] and "--data-parallel" not in started[0]
    data = json.loads(result.read_text())
    runs = data["runs"]
    assert [r["name"][:3] for r in runs] == ["(a)", "(b)", "(c)", "(d)"]
    assert len({r["server_log"] for r in runs}) == 1 and all(r["serve_flags"] == [] for r in runs)
    for r in runs:
        s = r["summary"]
        assert s["completed"] == NUM and s["failed"] == 0 and s["output_tokens_from"] == {"usage": NUM}
        # Every prompt looked up in the prefix cache once, each token of it: the server's count of the run.
        assert r["prefix_cache"]["queries"] == s["total_input_tokens"]
        assert 0 <= r["prefix_cache"]["hits"] <= r["prefix_cache"]["queries"]
        assert sum(sum(reasons.values()) for reasons in r.get("placements", {}).values()) in (0, NUM)
    assert runs[2]["summary"]["total_output_tokens"] == runs[3]["summary"]["total_output_tokens"] == NUM * 3
    # The prefix runs' prompts: two groups sharing 48 tokens each, a question after; their own, as each run's
    # number comes first (no run finds another's prompts in the cache: (d) has no more hits than (c) could).
    assert runs[2]["prefix_cache"]["hits"] <= (NUM - 2) * 48 and runs[3]["prefix_cache"]["hits"] <= (NUM - 2) * 48
    # The table: a row a run, (b) / (a) and (d) / (c) as the JSON's throughputs give them.
    rows = {line[:3]: line for line in proc.stdout.splitlines() if re.match(r"\([abcd]\) ", line)}
    assert list(rows) == ["(a)", "(b)", "(c)", "(d)"]
    throughput = [r["summary"]["output_throughput"] for r in runs]
    assert f"{throughput[1] / throughput[0]:6.3f}" in rows["(b)"]
    assert f"{throughput[3] / throughput[2]:6.3f}" in rows["(d)"]
    assert all("%" in rows[row] for row in rows)                            # the prefix cache's hit rate
