"""compose.yaml and its overrides (deploy/compose/) are valid (docker-compose config), every command in them is a
`pagestream` command the CLI parses, and every service's command starts and serves.

There is no Docker engine here, so each container's command runs as a process against a local redis-server,
with the environment compose gives it (Redis URL rewritten to the local one): once all run, the worker twice (as
`docker compose up --scale worker=2` runs it), a request makes the round trip through every one of them
(/health/ready), and each stops cleanly on SIGTERM. The bus override's Redis command runs too, against the
redis-server here: it must refuse a client without the password.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml

from conftest import REPO, _free_port, parse_pagestream
from services.redis_server import redis_server_binary

SERVICES = {"redis", "worker", "scheduler", "tokenizer", "detokenizer", "gateway"}
GPUS = "deploy/compose/gpus.yaml"
BUS = "deploy/compose/bus.yaml"
PASSWORD = "0123456789abcdef" * 4         # as `openssl rand -hex 32` makes them (docs/deployment.md)


def compose_config(*overrides: str, **env: str) -> subprocess.CompletedProcess:
    """`docker-compose config` of compose.yaml and the overrides, with env as the shell's (or .env's) variables,
    and none of this shell's PAGESTREAM_ ones."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed (scripts/setup.sh --test installs it: apt-get install docker-compose)"
    files = [arg for path in ("compose.yaml", *overrides) for arg in ("-f", str(REPO / path))]
    shell = {k: v for k, v in os.environ.items() if not k.startswith("PAGESTREAM_")}
    return subprocess.run([binary, *files, "config"], capture_output=True, text=True, env={**shell, **env})


def config(*overrides: str, **env: str) -> dict:
    result = compose_config(*overrides, **env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return config()


def test_compose_declares_the_pipeline(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["redis"]["image"].startswith("redis:7")
    assert services["tokenizer"]["deploy"]["replicas"] == 3
    for name in SERVICES - {"redis"}:
        assert services[name]["command"][:3] == ["pagestream", "service", name]
        assert any(v.endswith(":/models:rw") or v.endswith(":/models") for v in services[name]["volumes"])
        assert services[name]["environment"]["PAGESTREAM_REDIS_URL"] == "redis://redis:6379/0"
    assert "models" in compose["volumes"]


@pytest.mark.parametrize("overrides,env", [((), {}), ((GPUS,), {}),
                                           ((BUS,), {"PAGESTREAM_REDIS_PASSWORD": PASSWORD})])
def test_every_command_is_a_pagestream_command(overrides, env):
    services = config(*overrides, **env)["services"]
    workers = 0
    for name, service in services.items():
        if name == "redis":
            continue
        args = parse_pagestream(service["command"])
        assert args.command == "service" and name.startswith(args.service), (name, service["command"])
        if args.service == "worker":     # replicas of one service, or a service per GPU: each names itself
            workers += 1
            assert args.worker_name == "auto", name
    assert workers == (2 if GPUS in overrides else 1)


def test_gpu_override_gives_each_worker_a_gpu_of_its_own():
    services = config(GPUS)["services"]
    workers = {name: s for name, s in services.items() if s["command"][:3] == ["pagestream", "service", "worker"]}
    assert set(workers) == {"worker", "worker-gpu1"}
    gpus = []
    for name, service in workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "count" not in devices[0], f"{name}: a count would give every replica the first GPUs"
        gpus += devices[0]["device_ids"]
    assert sorted(gpus) == ["0", "1"]
    # worker-gpu1 repeats compose.yaml's worker (Compose v1 cannot extend it): everything but the GPU is the same.
    without_gpus = [{k: v for k, v in s.items() if k != "deploy"} for s in workers.values()]
    assert without_gpus[0] == without_gpus[1]


def test_bus_override_publishes_redis_behind_its_password(tmp_path):
    refused = compose_config(BUS)
    assert refused.returncode != 0 and "set PAGESTREAM_REDIS_PASSWORD" in refused.stderr
    url = f"redis://:{PASSWORD}@redis:6379/0"            # .env's, as docs/deployment.md writes it
    services = config(BUS, PAGESTREAM_REDIS_PASSWORD=PASSWORD, PAGESTREAM_REDIS_URL=url)["services"]
    redis_service = services["redis"]
    assert any(str(p.get("published")) == "6379" and p["target"] == 6379 for p in redis_service["ports"])
    for name in SERVICES - {"redis"}:
        assert services[name]["environment"]["PAGESTREAM_REDIS_URL"] == url
    # Its command, as the container runs it (Compose turns $$ into $), on a free loopback port of this machine.
    shell, flag, script = redis_service["command"]
    assert (shell, flag) == ("sh", "-c")
    port = _free_port()
    script = script.replace("$$", "$") + f" --port {port} --bind 127.0.0.1 --dir {tmp_path}"
    env = {**os.environ, **redis_service["environment"],
           "PATH": f"{Path(redis_server_binary()).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([shell, flag, script], env=env, stdout=open(tmp_path / "redis.log", "w"),
                            stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the bus's redis-server did not answer"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_connect_timeout=1).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="not-" + PASSWORD, socket_connect_timeout=1).ping()
        # exec: redis-server is the container's first process (it gets docker stop's SIGTERM), and ps shows no
        # password once it runs.
        assert Path(f"/proc/{proc.pid}/exe").resolve() == Path(redis_server_binary()).resolve()
        assert PASSWORD not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_every_service_command_starts(compose, tmp_path, redis_url):
    port = _free_port()
    procs = {}
    try:
        for name in ("worker", "worker-2", "scheduler", "tokenizer", "detokenizer", "gateway"):
            service = compose["services"][name.removesuffix("-2")]
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
