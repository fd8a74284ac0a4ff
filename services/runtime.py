"""What every service process shares: logging, a stop event set by SIGINT/SIGTERM, a heartbeat thread."""
from __future__ import annotations

import logging
import signal
import threading

from services.transport import HEARTBEAT_SECONDS, Transport

log = logging.getLogger("pagestream")


def setup_logging(service: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def stop_event() -> threading.Event:
    """Set on SIGINT or SIGTERM, so a service finishes what it holds and exits cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


class Heartbeat(threading.Thread):
    """Refreshes `key` (with a TTL) every second: others see this service as alive while the key exists, and
    its value (an epoch) changes when the service restarts."""

    def __init__(self, transport: Transport, key: str, value: str, stop: threading.Event):
        super().__init__(name=f"heartbeat {key}", daemon=True)
        self.transport, self.key, self.value, self.stop = transport, key, value, stop

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.transport.heartbeat(self.key, self.value)
            except Exception:
                log.exception("heartbeat %s failed", self.key)
            self.stop.wait(HEARTBEAT_SECONDS)
        try:
            self.transport.redis.delete(self.key)        # a clean exit is seen at once, not after the TTL
        except Exception:
            pass
