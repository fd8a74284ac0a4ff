"""`pagestream serve` is safe to start beside others and to stop at any time, and the gRPC API keeps its clients
apart; all with real processes, a real redis-server and the default model on the CPU.

- A port in use (--port, --grpc-port, --redis-port) fails at once, naming the port and the flag.
- A second serve with the defaults (loopback, no gRPC) runs beside one already serving, and both serve.
- During the startup wait serve restarts a service that dies, and Ctrl-C stops everything within seconds; with
  --gateways 2 --grpc-port both gateways serve gRPC on the one port. A service that cannot start at all (here:
  a tokenizer file that is not JSON) stops serve with its name, instead of being restarted for ever.
- gRPC clients that send the same request_id to two gateways on one Redis each get their own text, their id
  echoed, and nothing of the server's state is keyed by it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import psutil
import pytest
import redis

from conftest import REPO, _free_port, start_stack, stop_stack
from schemas import pagestream_pb2 as pb
from schemas import pagestream_pb2_grpc as pb_grpc
from services.launcher import wait_ready

FAIL_FAST_S = 20            # serve's imports alone take a few seconds on this 2-core machine
STOP_S = 10


def serve_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "serve", "--prefix", f"ports{os.getpid()}", *flags]


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_flags_default_to_loopback_and_no_grpc():
    from services.gateway import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.grpc_port) == ("127.0.0.1", None)


@pytest.mark.parametrize("flag", ["--port", "--grpc-port", "--redis-port"])
def test_a_port_in_use_fails_at_once_naming_port_and_flag(flag, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    flags = {"--port": str(_free_port()), "--grpc-port": str(_free_port()), "--redis-port": str(_free_port())}
    flags[flag] = str(port)
    started = time.monotonic()
    try:
        result = subprocess.run(serve_argv(*[x for kv in flags.items() for x in kv]), cwd=REPO, capture_output=True,
                                text=True, timeout=FAIL_FAST_S * 3)
    finally:
        taken.close()
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f} s to fail"
    message = result.stderr.strip().splitlines()[-1]
    assert str(port) in message and flag in message and "in use" in message, result.stderr[-2000:]
    assert "is serving" not in result.stdout


def test_startup_restarts_the_dead_and_stops_on_sigint(tmp_path):
    """Everything here happens while the worker still loads the model: serve has not yet seen /health/ready."""
    grpc_port = _free_port()
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen(serve_argv("--port", str(_free_port()), "--gateways", "2", "--grpc-port", str(grpc_port)),
                            cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = lambda: log_path.read_text(errors="replace")                          # noqa: E731
    try:
        # Both gateways serve gRPC on the one port (sharing it: neither exits for want of it).
        wait_for(lambda: log().count("gRPC API on") == 2 or proc.poll() is not None, 120, "two gRPC servers")
        assert proc.poll() is None and "exited with" not in log(), log()[-3000:]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)

        def tokenizers() -> list[int]:
            pids = []
            for child in descendants(proc.pid):
                try:
                    if "tokenizer" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                        pids.append(child.pid)
                except psutil.Error:              # gone, or a zombie not yet reaped
                    pass
            return pids

        wait_for(lambda: len(tokenizers()) == 1, 30, "the tokenizer")
        [victim] = tokenizers()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: tokenizers() and tokenizers() != [victim], 10, "the tokenizer to be restarted")
        assert "is serving" not in log(), "the model loaded before the test was done: it tests nothing"

        children = descendants(proc.pid)
        assert len(children) >= 7                 # redis, worker, scheduler, tokenizer, detokenizer, 2 gateways
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=STOP_S) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running {STOP_S} s after SIGINT; alive: "
                                 f"{[p for p in children if p.is_running()]}\n{log()[-3000:]}")
        _, alive = psutil.wait_procs(children, timeout=1)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:                   # a failed test: leave no process of this serve behind
            left = descendants(proc.pid)
            proc.kill()
            proc.wait()
            for child in left:
                child.kill()


def test_a_service_that_cannot_start_stops_serve_naming_it(tmp_path):
    from engine.model_files import resolve_model
    from services.launcher import STARTUP_DEATHS
    model = resolve_model("smollm2-135m-instruct").path
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    for name in ("tokenizer_config.json", "config.json"):
        (broken / name).write_bytes((model / name).read_bytes())
    (broken / "tokenizer.json").write_text('{"model": ')                 # cut short: not JSON
    log_path = tmp_path / "serve.log"
    started = time.monotonic()
    proc = subprocess.Popen(serve_argv("--port", str(_free_port()), "--tokenizer", str(broken)), cwd=REPO,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        returncode = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"serve still restarting after 300 s:\n{log_path.read_text()[-3000:]}") from None
    log = log_path.read_text(errors="replace")
    last = log.strip().splitlines()[-1]
    assert returncode == 1 and "is serving" not in log
    assert re.fullmatch(rf"the (worker|tokenizer|detokenizer) service exited {STARTUP_DEATHS} times before the "
                        r"server was ready, the last time with 1: it cannot start \(its error is above\); stopping",
                        last), log[-3000:]
    assert "JSONDecodeError" in log                                       # the services' own error, above
    print(f"serve stopped {time.monotonic() - started:.0f} s after its start")
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(broken) in " ".join(p.info["cmdline"] or [])]


# ---- a second serve beside the first ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def second_stack(serve_stack, tmp_path_factory):
    """A serve with the defaults (no --grpc-port, no --host) beside the session's serve_stack."""
    stack = start_stack(tmp_path_factory.mktemp("second"), api_key=None, grpc=False)
    yield stack
    stop_stack(stack)


def complete(base_url: str, prompt: str, key: str | None) -> str:
    import json
    body = json.dumps({"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 4, "temperature": 0})
    headers = {"content-type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"{base_url}/v1/completions", body.encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.load(r)["choices"][0]["text"]


def test_a_second_serve_beside_a_running_one_serves(serve_stack, second_stack):
    assert complete(second_stack.base_url, "The capital of France is", None)
    assert complete(serve_stack.base_url, "The capital of France is", serve_stack.api_key)
    port = second_stack.base_url.rsplit(":", 1)[1]
    banner = [line for line in second_stack.log().splitlines() if "is serving" in line]
    assert banner and f"http://127.0.0.1:{port} " in banner[0] and "gRPC" not in banner[0]
    assert "gRPC API on" not in second_stack.log() and "exited with" not in second_stack.log()


# ---- one request_id from two gRPC clients ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_grpc_gateways(second_stack, tmp_path_factory):
    """Two gateway processes with gRPC, on the second stack's Redis beside its own gateway: their gRPC ports."""
    logs = tmp_path_factory.mktemp("gateways")
    ports, procs = [_free_port(), _free_port()], []
    for i, grpc_port in enumerate(ports):
        argv = [sys.executable, "-m", "services.cli", "service", "gateway", "--redis-url", second_stack.redis_url,
                "--prefix", second_stack.prefix, "--max-model-len", "2048", "--port", str(_free_port()),
                "--grpc-port", str(grpc_port)]
        procs.append((subprocess.Popen(argv, cwd=REPO, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"}), argv[argv.index("--port") + 1]))
    try:
        for proc, http_port in procs:
            assert wait_ready(f"http://127.0.0.1:{http_port}", 120, alive=lambda: proc.poll() is None), \
                (logs / "0.log").read_text()[-2000:] + (logs / "1.log").read_text()[-2000:]
        yield ports
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


PROMPTS = ["The capital of France is", "One, two, three,", "def fibonacci(n):", "The color of the sky is"]


def generate(grpc_port: int, prompt: str, request_id: str) -> tuple[set[str], str]:
    """The request ids the responses carried, and the text."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        request = pb.GenerateRequest(request_id=request_id, prompt=prompt, sampling_params=pb.SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))
        responses = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=120))
    return {r.request_id for r in responses}, "".join(r.text for r in responses)


def test_one_request_id_from_clients_of_two_gateways(second_stack, two_grpc_gateways):
    ports = [two_grpc_gateways[i % 2] for i in range(len(PROMPTS))]      # each prompt's gateway, alternating
    alone = [generate(port, prompt, "") for port, prompt in zip(ports, PROMPTS)]
    assert all(len(ids) == 1 and next(iter(ids)).startswith("grpc-") for ids, _ in alone)   # the server's own id
    assert len({text for _, text in alone}) == len(PROMPTS)

    shared_id = f"mine-{os.getpid()}"
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(generate, ports, PROMPTS, [shared_id] * len(PROMPTS)))
    assert [ids for ids, _ in together] == [{shared_id}] * len(PROMPTS)
    assert [text for _, text in together] == [text for _, text in alone]

    client = redis.Redis.from_url(second_stack.redis_url)
    try:
        assert [k for k in client.scan_iter(f"{second_stack.prefix}:*") if shared_id.encode() in k] == []
    finally:
        client.close()


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------
def test_ctrl_c_stops_everything_and_redis_last(tmp_path):
    """A terminal's Ctrl-C is sent to serve's whole process group (stop_stack sends it so). Every process serve
    starts leads a group of its own, out of its reach: serve alone gets it, and stops each service once, Redis
    last. Before, each service got SIGINT and serve's SIGTERM together (a scheduler hung in its signal handler
    until serve killed it, a gateway printed uvicorn's forced-exit traceback), and Redis quit at once, while the
    services still read and wrote."""
    stack = start_stack(tmp_path, api_key=None, grpc=False)
    try:
        assert complete(stack.base_url, "The capital of France is", None)
        children = descendants(stack.proc.pid)
        assert {p.name() for p in children} >= {"redis-server"} and len(children) >= 6
        assert all(os.getpgid(p.pid) == p.pid for p in children if p.ppid() == stack.proc.pid)
    finally:
        started = time.monotonic()
        stop_stack(stack)
    stopped_s = time.monotonic() - started
    assert stack.proc.returncode == 0, stack.log()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=STOP_S)
    assert not alive, f"left behind: {alive}"
    assert stopped_s < STOP_S, f"took {stopped_s:.1f} s: a service waited for serve's grace to run out"
    assert "cannot reach Redis" not in stack.log() and "Traceback" not in stack.log(), stack.log()[-3000:]
