"""What every service process shares: logging, a stop event set by SIGINT/SIGTERM, a heartbeat thread, and the
loop that outlives Redis going away (keep_running)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, TypeVar

from services.transport import HEARTBEAT_SECONDS, REDIS_DOWN, RedisOutage, Transport

log = logging.getLogger("pagestream")

T = TypeVar("T")


def setup_logging(service: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def stop_event() -> threading.Event:
    """Set on SIGINT or SIGTERM, so a service finishes what it holds and exits cleanly.

    The handler only writes a byte to a pipe; a thread of its own reads it and sets the event. Python runs a
    handler in the main thread between two bytecodes, which may be inside stop.wait, or inside the handler of the
    signal before, while that thread holds the event's lock: a handler that set the event itself would wait for
    that lock for ever. A served scheduler given SIGINT and SIGTERM together hung so until serve killed it."""
    stop = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def set_when_signalled() -> None:
        os.read(read_end, 1)
        stop.set()

    def on_signal(*_) -> None:
        try:
            os.write(write_end, b"\0")
        except BlockingIOError:              # the pipe is full of earlier signals' bytes: one is enough
            pass

    threading.Thread(target=set_when_signalled, name="stop on signal", daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return stop


def keep_running(stop: threading.Event, iteration: Callable[[], object], what: str,
                 transport: Transport | None = None) -> None:
    """Call iteration() until stop is set. While Redis cannot be reached (gone, restarting, loading its
    append-only file) wait it out, with backoff, instead of exiting: a service that exited would be restarted
    over and over, losing what it holds. An iteration cut short by Redis going away is simply run again, which
    each service makes harmless (its consumers acknowledge entries in the transaction that writes their effect,
    and drop repeats); `transport`'s consumers first read their pending entries again (lost_connection)."""
    outage = RedisOutage(what)
    while not stop.is_set():
        _through_outages(stop, iteration, outage, transport)


def until_done(stop: threading.Event, call: Callable[[], T], what: str) -> T | None:
    """call()'s result, retried while Redis cannot be reached; None if stop is set first."""
    return _through_outages(stop, call, RedisOutage(what), None)


def _through_outages(stop: threading.Event, call: Callable[[], T], outage: RedisOutage,
                     transport: Transport | None) -> T | None:
    while not stop.is_set():
        try:
            result = call()
        except REDIS_DOWN as e:
            delay = outage.failed(e)
            if transport is not None:
                transport.lost_connection()
            stop.wait(delay)
            continue
        outage.recovered()
        return result
    return None


class Heartbeat(threading.Thread):
    """Refreshes `key` (with a TTL) every second: others see this service as alive while the key exists, and
    its value (an epoch) changes when the service restarts. Redis gone, it tries again sooner (with backoff), so
    the key is back within moments of Redis."""

    def __init__(self, transport: Transport, key: str, value: str, stop: threading.Event):
        super().__init__(name=f"heartbeat {key}", daemon=True)
        self.transport, self.key, self.value, self.stop = transport, key, value, stop

    def run(self) -> None:
        outage = RedisOutage(f"heartbeat {self.key}")
        while not self.stop.is_set():
            try:
                self.transport.heartbeat(self.key, self.value)
            except REDIS_DOWN as e:
                self.stop.wait(outage.failed(e))
                continue
            except Exception:
                log.exception("heartbeat %s failed", self.key)
            else:
                outage.recovered()
            self.stop.wait(HEARTBEAT_SECONDS)
        try:
            self.transport.redis.delete(self.key)        # a clean exit is seen at once, not after the TTL
        except Exception:
            pass
