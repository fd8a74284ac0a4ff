"""A served stack's processes, from /proc: `pagestream serve`'s descendants, each one's role and argv, and how busy
each was during a run (the share of one core it used).

At a small model's pace the pipeline's cost is its Python services' CPU (on the Llama-3.2-1B shape the gateways
and detokenizers ran at a whole core each while the GPU made 40,000 tokens a second), and which role is saturated
says what to scale out (--gateways, --detokenizers) or to make cheaper. The shares come from each process's user
and system time (/proc/<pid>/stat) at a run's start and end, so they cost nothing while the run goes; the bench
itself is the client. Linux only: elsewhere there is nothing to report.

    shares = CpuShares(server_pid)          # the `pagestream serve` process: it and all its descendants
    ... the run ...
    print(format_shares(shares.done()))     # gateway 0.98 0.97 ...; detokenizer 0.85 0.81; worker 1.00; ...

    for pid in descendants(server_pid): ... argv(pid) ...     # loadtest.data_parallel finds a worker to kill
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

PROC = Path("/proc")
CLIENT = "client"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# The order roles are printed in: the request's way through the stack.
ROLE_ORDER = ("client", "gateway", "tokenizer", "scheduler", "worker", "publisher", "detokenizer", "redis-server",
              "serve")


def role_of(cmdline: str) -> str:
    """A process's role, from its command line: `... service gateway ...` is a gateway, and so on."""
    if m := re.search(r"\bservice (\w+)", cmdline):
        return m.group(1)
    if "services.publisher" in cmdline:
        return "publisher"
    if "redis-server" in cmdline:
        return "redis-server"
    if re.search(r"services\.cli serve|pagestream serve", cmdline):
        return "serve"
    return cmdline.split()[0].rsplit("/", 1)[-1] if cmdline.strip() else "?"


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds so far) of a live process; None if it is gone, or dead and waiting to be reaped."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()          # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def argv(pid: int) -> list[str]:
    """A process's command line ([] if it is gone)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def descendants(root: int) -> dict[int, float]:
    """root and every live descendant: pid -> CPU seconds so far ({} if root is gone)."""
    stats = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
            todo += children.get(pid, [])
    return out


class CpuShares:
    """The CPU each process of server_pid's tree (and this process, the client) used from now to done()."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.available = PROC.is_dir()
        self.start = time.monotonic()
        self.before = self._sample()

    def _sample(self) -> dict[int, float]:
        if not self.available:
            return {}
        cpu = descendants(self.server_pid)
        if (own := _stat(os.getpid())) is not None:
            cpu[os.getpid()] = own[1]
        return cpu

    def done(self) -> dict[str, list[float]]:
        """role -> each of its processes' share of a core over the run (processes that lived through it)."""
        after, seconds = self._sample(), max(time.monotonic() - self.start, 1e-9)
        shares: dict[str, list[float]] = {}
        for pid, cpu in after.items():
            if pid in self.before:
                role = CLIENT if pid == os.getpid() else role_of(" ".join(argv(pid)))
                shares.setdefault(role, []).append(round((cpu - self.before[pid]) / seconds, 3))
        return {role: sorted(v, reverse=True) for role, v in shares.items()}


def format_shares(shares: dict[str, list[float]]) -> str:
    """'gateway 0.98 0.97; detokenizer 0.85 0.81; ...', roles in the requests' order through the stack."""
    order = {role: i for i, role in enumerate(ROLE_ORDER)}
    roles = sorted(shares, key=lambda r: (order.get(r, len(order)), r))
    return "; ".join(f"{role} " + " ".join(f"{s:.2f}" for s in shares[role]) for role in roles) or "not measured"
