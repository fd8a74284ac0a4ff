"""The data-parallel benchmark (loadtest/data_parallel.py): which server each run gets, how the kill's cost is read
from two runs of the same requests, how the worker to kill is found, and the whole command on the CPU with two
workers, one of them killed in run (e)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

from loadtest.data_parallel import added_latency, by_server, plan, worker_pid
from test_loadtest_serve import REPO

NUM = 6


def test_runs_with_the_same_serve_flags_share_a_server():
    runs = plan(argparse.Namespace(data_parallel_size=2, workload="w1000", kill=True))
    prefix, round_robin = ["--data-parallel-size", "2", "--placement", "prefix"], \
        ["--data-parallel-size", "2", "--placement", "round-robin"]
    assert [r.serve_flags for r in runs] == [[], prefix, round_robin, prefix, prefix]
    assert [r.dataset for r in runs] == ["workload", "workload", "prefix", "prefix", "workload"]
    assert [r.kill for r in runs] == [False] * 4 + [True]
    assert runs[4].name == "(e) w1000, w1 killed"
    # Three servers: (b), (d) and (e) on one, in that order, so (b) ran before (e) kills a worker of it.
    assert list(by_server(runs).values()) == [[0], [1, 3, 4], [2]]
    assert [r.name[:3] for r in plan(argparse.Namespace(data_parallel_size=4, workload="w256", kill=False))] == \
        ["(a)", "(b)", "(c)", "(d)"]                                          # --no-kill
    one = plan(argparse.Namespace(data_parallel_size=1, workload="w256", kill=True))
    assert [r.serve_flags for r in one] == [[]] * 4 and list(by_server(one).values()) == [[0, 1, 2, 3]]
    assert [r.name for r in one] == ["(a) w256, 1 worker", "(b) w256, 1 worker", "(c) prefix, 1 worker",
                                     "(d) prefix, 1 worker"]                 # one worker: no kill run


def test_the_moved_requests_are_the_largest_increases():
    before = [1.0, 2.0, 1.5, 3.0, 2.5, None, 1.0]
    after = [1.1, 5.0, 1.4, 3.2, 6.5, 4.0, None]                      # two failed ones are left out
    got = added_latency(before, after, migrated=2)
    # By hand: the increases in ms are 100, 3000, -100, 200, 4000; the two largest 4000 and 3000, the rest's
    # median that of 200, 100, -100.
    assert got["migrated"] == 2 and got["compared"] == 5
    assert got["moved_p50_ms"] == pytest.approx(3500) and got["moved_max_ms"] == pytest.approx(4000)
    assert got["moved_p99_ms"] == pytest.approx(3000 + 0.99 * 1000)
    assert got["rest_median_ms"] == pytest.approx(100)
    nothing = added_latency([1.0], [1.0], migrated=0)
    assert nothing["compared"] == 1 and nothing["rest_median_ms"] == 0 and math.isnan(nothing["moved_max_ms"])


def test_the_worker_is_found_among_serves_descendants():
    """A process tree like serve's: a parent, a child, and the worker processes a level below, found by their
    command line; a process of the same command line outside the tree is not serve's."""
    sleeper = "import sys, time; time.sleep(60)"
    spawn = ("import os, subprocess, sys, time; ps = [subprocess.Popen([sys.executable, '-c', %r, 'service', "
             "'worker', '--prefix', 'p', '--worker-name', name]) for name in ('w0', 'w1')]; "
             "print(os.getpid(), *[p.pid for p in ps], flush=True); time.sleep(60)" % sleeper)
    outsider = subprocess.Popen([sys.executable, "-c", sleeper, "service", "worker", "--worker-name", "w2"])
    serve = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                              f"{spawn!r}])"], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in serve.stdout.readline().split()]          # serve's child, then its two workers
    try:
        assert worker_pid(serve.pid, "w0") == pids[1] and worker_pid(serve.pid, "w1") == pids[2]
        assert worker_pid(serve.pid, "w2") is None and worker_pid(outsider.pid, "w1") is None
        assert worker_pid(serve.pid, "w") is None                      # the whole name, not a prefix of it
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for proc in (serve, outsider):
            proc.kill()
            proc.wait()


def test_the_five_runs_on_two_cpu_workers_one_killed(tmp_path):
    result = tmp_path / "dp.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loadtest.data_parallel", "--data-parallel-size", "2",
                           "--workload", "w256", "--scale", "0.1", "--num-prompts", str(NUM), "--prefix-count", "2",
                           "--prefix-len", "48", "--suffix-len", "8", "--output-len", "3", "--max-model-len", "2048",
                           "--num-blocks", "512", "--tokenizers", "1", "--detokenizers", "1",
                           "--result-json", str(result), "--server-logs", str(tmp_path / "logs")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    print(f"the command took {time.monotonic() - started:.0f} s")
    # Three servers, each with the engine flags given (--num-blocks among them); the data-parallel ones with 2.
    served = [line for line in proc.stdout.splitlines() if "served: services.cli serve" in line]
    assert len(served) == 3 and all("--max-model-len 2048" in s and "--num-blocks 512" in s for s in served)
    assert "--data-parallel" not in served[0] and all("--data-parallel-size 2" in s for s in served[1:])
    runs = json.loads(result.read_text())["runs"]
    assert [r["name"][:3] for r in runs] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert runs[1]["server_log"] == runs[3]["server_log"] == runs[4]["server_log"] != runs[2]["server_log"]
    logs = sorted((tmp_path / "logs").iterdir())           # where --server-logs said, one a server
    assert [p.name for p in logs] == ["serve-1.log", "serve-2.log", "serve-3.log"]
    assert {r["server_log"] for r in runs} == {str(p) for p in logs} and all(p.stat().st_size for p in logs)
    for r in runs:
        s = r["summary"]
        assert s["completed"] == NUM and s["failed"] == 0 and s["output_tokens_from"] == {"usage": NUM}
        # Every prompt looked up in the prefix cache once, each token of it: the server's count of the run ((e):
        # unknown, the killed worker took its count with it).
        if r["name"][:3] != "(e)":
            assert r["prefix_cache"]["queries"] == s["total_input_tokens"]
        if r["name"][:3] != "(e)":                # (e): the killed worker's placement counts went with it
            placed = sum(sum(reasons.values()) for reasons in r.get("placements", {}).values())
            assert placed == NUM or (r is runs[0] and placed == 0)
        assert len(r["e2el_s"]) == NUM and all(e > 0 for e in r["e2el_s"])
    assert runs[2]["summary"]["total_output_tokens"] == runs[3]["summary"]["total_output_tokens"] == NUM * 3
    # (e): w1 killed while it held requests; each moved to w0 and finished there, with every token once (the
    # server's usage counts each token once: (e) has (b)'s tokens, no more, no fewer).
    e, b = runs[4], runs[1]
    assert e["killed"]["worker"] == "w1" and e["killed"]["after_s"] >= 0
    assert e["migrated"] > 0, "no request was on the killed worker when it died: run (e) measured nothing"
    assert e["placements"]["w0"].get("migrated") == e["migrated"] and "migrated" not in e["placements"].get("w1", {})
    assert all(r["migrated"] == 0 for r in runs[:4])
    assert e["summary"]["total_output_tokens"] == b["summary"]["total_output_tokens"]
    # The added end-to-end time: the migrated largest of (e) minus (b), request by request; the rest's median.
    increases = sorted((x - y) * 1000 for x, y in zip(e["e2el_s"], b["e2el_s"]))
    added = e["added_e2el"]
    assert added["migrated"] == e["migrated"] and added["compared"] == NUM
    assert added["moved_max_ms"] == pytest.approx(increases[-1])
    rest = increases[:NUM - e["migrated"]]
    assert added["rest_median_ms"] == (pytest.approx(statistics.median(rest)) if rest else None)
    # The table: a row a run, (b) / (a), (d) / (c), (e) / (b) as the JSON's throughputs give them; the kill's line.
    rows = {line[:3]: line for line in proc.stdout.splitlines() if re.match(r"\([abcde]\) ", line)}
    assert list(rows) == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    throughput = [r["summary"]["output_throughput"] for r in runs]
    assert f"{throughput[1] / throughput[0]:6.3f}" in rows["(b)"]
    assert f"{throughput[3] / throughput[2]:6.3f}" in rows["(d)"]
    assert f"{throughput[4] / throughput[1]:6.3f}" in rows["(e)"]
    assert f"{e['summary']['p99_e2el_ms']:9.1f}" in rows["(e)"]
    assert all("%" in rows[row] for row in ("(a)", "(b)", "(c)", "(d)"))   # the prefix cache's hit rate
    kill_line = next(line for line in proc.stdout.splitlines() if line.startswith("(e): w1 killed"))
    assert f"{e['migrated']} requests moved" in kill_line and f"max {added['moved_max_ms']:.0f} ms" in kill_line
