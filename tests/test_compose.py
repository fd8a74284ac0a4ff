"""compose.yaml is valid (docker-compose config) and every service's command starts and serves.

There is no Docker engine here, so each container's command runs as a process against a local redis-server,
with the environment compose gives it (Redis URL rewritten to the local one): once all run, a request makes the
round trip through every one of them (/health/ready), and each stops cleanly on SIGTERM.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import REPO, _free_port

SERVICES = {"redis", "worker", "scheduler", "tokenizer", "detokenizer", "gateway"}


@pytest.fixture(scope="module")
def compose() -> dict:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed (scripts/setup.sh --test installs it: apt-get install docker-compose)"
    result = subprocess.run([binary, "-f", str(REPO / "compose.yaml"), "config"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_declares_the_pipeline(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["redis"]["image"].startswith("redis:7")
    assert services["tokenizer"]["deploy"]["replicas"] == 3
    for name in SERVICES - {"redis"}:
        assert services[name]["command"][:3] == ["pagestream", "service", name]
        assert any(v.endswith(":/models:rw") or v.endswith(":/models") for v in services[name]["volumes"])
    assert "models" in compose["volumes"]


def test_every_service_command_starts(compose, tmp_path, redis_url):
    port = _free_port()
    procs = {}
    try:
        for name in ("worker", "scheduler", "tokenizer", "detokenizer", "gateway"):
            service = compose["services"][name]
            command = [sys.executable, "-m", "services.cli"] + service["command"][1:]
            command = [str(port) if prev == "--port" else arg for prev, arg in zip([None] + command, command)]
            command = [str(_free_port()) if prev == "--grpc-port" else arg
                       for prev, arg in zip([None] + command, command)]
            env = {**os.environ, **service["environment"], "PAGESTREAM_REDIS_URL": redis_url,
                   "PAGESTREAM_CACHE": os.environ.get("PAGESTREAM_CACHE", str(os.path.expanduser("~/.cache/pagestream")))}
            procs[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=open(tmp_path / f"{name}.log", "w"),
                                           stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=15) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the services did not become ready"
            time.sleep(0.5)
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            assert proc.wait(timeout=30) == 0, f"{name} did not stop cleanly:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
