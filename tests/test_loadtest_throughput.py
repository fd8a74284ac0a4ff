"""The harness must never be what limits a measurement: one `python -m loadtest` process against a server that
streams like a batching engine (every stream in flight gets a chunk each millisecond, one write per chunk) must
take in chunks far faster than a real server on this machine produces them. The issue asks for 20,000 chunks/s on
the 2-core development machine; the bound asserted here is lower, to hold on a loaded CI machine, and the real
figure is printed (pytest -s)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_loadtest_serve import REPO, FakeServer

CI_BOUND = 5_000          # chunks/s


def test_one_process_drives_many_thousand_chunks_per_second(tmp_path: Path):
    server = FakeServer("--step-ms", "1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "go"}) + "\n")
    result = tmp_path / "result.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "loadtest", "--base-url", server.url, "--dataset", "jsonl",
                               "--dataset-path", str(prompts), "--output-len", "400", "--num-prompts", "256",
                               "--max-concurrency", "64", "--num-warmups", "4", "--disable-tqdm",
                               "--result-json", str(result)], cwd=REPO, capture_output=True, text=True, timeout=300)
        sent = server.log()["chunks_sent"]
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(result.read_text())["runs"][0]["summary"]
    assert summary["completed"] == 256 and summary["total_output_tokens"] == 256 * 400
    assert summary["total_chunks"] == 256 * 400 == sent - 4 * 400       # every chunk seen, one token each
    rate = summary["total_chunks"] / summary["duration_s"]
    print(f"\none harness process: {rate:,.0f} chunks/s ({summary['total_chunks']} chunks from 64 streams in "
          f"{summary['duration_s']:.2f} s; median ITL {summary['median_itl_ms']:.2f} ms for a 1 ms server step)")
    assert rate >= CI_BOUND
