"""The worker's publisher: a process of its own that sends each step's tokens on to the detokenizers.

The model loop must not spend its time (nor hold the GIL) building messages: at a small model's pace (a step every
3 to 4 ms) a publisher thread beside it fell a second behind. So the worker only writes each step's columns, as one
msgpack frame, to this process's stdin (services.worker's pipe writer), and this process does the rest: for each
step, one columnar StepTokens message per detokenizer partition; for each plan, its StepEvent, acknowledged in
the same transaction as the plan it answers. Whatever is waiting goes out in one round trip, so falling behind
makes the trips bigger rather than the lag longer.

Frames (msgpack arrays; a 4-byte little-endian length before each), in the order the model loop made them:
    ["owners", [[seq_id, request_id, index, num_cached_tokens, partition], ...], [dropped seq_id, ...]]
    ["step", step, on_host, seq_ids, token_ids, positions, finish_reasons, stop_reasons, logprobs, first_stamps,
     prompt_logprobs]                               (prompt_logprobs: [[seq_id, prompt ids, entries, ranks], ...])
    ["event", encoded StepEvent, plan entry id]
    ["ack", plan entry id]                          (a plan the worker dropped as a repeat)
A sequence's owner is added before its first step and dropped after its last, so every token finds its request.
The process ends at the end of its input (the worker stopped or died), after publishing what it holds.

Redis gone, a batch is sent again (with backoff) until Redis takes it, and nothing after it goes first: the
tokens keep their order. A transaction that ran but whose reply was lost is sent twice; the detokenizers drop
tokens at positions they have handled, the scheduler events for plans it has heard of. Once its input has ended,
it gives up on a Redis still gone after FINAL_PUBLISH_S (nobody waits for those tokens: the worker is gone).

    python -m services.publisher [--redis-url URL] --prefix ps --worker w0     (the worker starts it; the URL
                                                                               defaults to $PAGESTREAM_REDIS_URL)
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import struct
import sys
import threading
import time
from typing import BinaryIO, Iterator

import msgpack

from schemas.codec import encode
from schemas.messages import PromptLogprobsWire, StepTokens, TokenLogprobsWire
from services.runtime import setup_logging
from services.transport import REDIS_DOWN, REDIS_URL_ENV, RedisOutage, Transport, Trimmer

log = logging.getLogger("pagestream.publisher")

GROUP = "worker"                   # the plan stream's consumer group (the worker's)
BATCH = 64                         # frames sent in one round trip at most
FINAL_PUBLISH_S = 5.0              # how long the last batch waits for a Redis that is gone (the worker waits 10 s)
_LENGTH = struct.Struct("<I")


def write_frame(stream: BinaryIO, frame: list) -> None:
    data = msgpack.packb(frame, use_bin_type=True)
    stream.write(_LENGTH.pack(len(data)) + data)


def read_frames(stream: BinaryIO) -> Iterator[list]:
    while True:
        header = stream.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return
        data = stream.read(_LENGTH.unpack(header)[0])
        yield msgpack.unpackb(data, raw=False)


class Publisher:
    def __init__(self, transport: Transport, worker: str):
        self.transport, self.names = transport, transport.names
        self.plans = self.names.plan(worker)
        self.events = self.names.events(worker)
        self.owners: dict[int, tuple[str, int, int, int]] = {}   # seq id -> (request id, index, cached, partition)
        # The streams this process writes: what their readers have acknowledged is trimmed (MAXLEN alone would
        # keep up to its count of entries, whatever their size).
        self.trim = Trimmer(transport, [self.events])
        self.outage = RedisOutage("publisher")

    def run(self, frames: Iterator[list]) -> None:
        waiting: queue.Queue = queue.Queue()

        def read() -> None:                       # the pipe is read on a thread: frames keep coming meanwhile
            for frame in frames:
                waiting.put(frame)
            waiting.put(None)

        threading.Thread(target=read, name="frames", daemon=True).start()
        while True:
            batch = [waiting.get()]
            while batch[-1] is not None and len(batch) < BATCH:
                try:
                    batch.append(waiting.get_nowait())
                except queue.Empty:
                    break
            writes: list[tuple[str | None, bytes | None, bytes | None]] = []
            try:
                for frame in batch:
                    if frame is not None:
                        self._apply(frame, writes)
                self._send(writes, last=batch[-1] is None)
            except Exception:
                log.exception("publishing failed")
            self.trim()
            if batch[-1] is None:
                return

    def _send(self, writes: list[tuple[str | None, bytes | None, bytes | None]], last: bool) -> None:
        """The batch's writes in one transaction, sent again while Redis is gone (built anew each time: a
        pipeline is emptied by its execute). `last`: the input has ended, give up after FINAL_PUBLISH_S."""
        while True:
            pipe = self.transport.pipeline()
            for stream, payload, acknowledged in writes:
                if stream is not None:
                    self.transport.publish(stream, payload, pipe)
                if acknowledged is not None:
                    self.transport.ack(self.plans, GROUP, [acknowledged], pipe)
            try:
                pipe.execute()
            except REDIS_DOWN as e:
                delay = self.outage.failed(e)
                if last and self.outage.down_for > FINAL_PUBLISH_S:
                    log.error("Redis is still gone: dropping the last %d messages", len(writes))
                    return
                time.sleep(delay)
                continue
            self.outage.recovered()
            return

    def _apply(self, frame: list, writes: list) -> None:
        """Apply one frame: owners change here, steps, events and acks become writes (stream and payload, or None
        for a bare ack; the plan entry acknowledged with it, or None)."""
        kind = frame[0]
        if kind == "owners":
            _, added, dropped = frame
            for seq_id, request_id, index, cached, partition in added:
                self.owners[seq_id] = (request_id, index, cached, partition)
            for seq_id in dropped:
                self.owners.pop(seq_id, None)
        elif kind == "step":
            self._publish_tokens(*frame[1:], writes)
        elif kind == "event":
            _, payload, entry_id = frame
            writes.append((self.events, payload, entry_id))
        elif kind == "ack":
            writes.append((None, None, frame[1]))
        else:
            raise ValueError(f"unknown frame {kind!r}")

    def _publish_tokens(self, step: int, on_host: float, seq_ids: list[int], token_ids: list[int],
                        positions: list[int], finish_reasons: list, stop_reasons: list, logprobs: list | None,
                        first_stamps: list, prompt_logprobs: list, writes: list) -> None:
        firsts = dict(first_stamps)
        prompts = {seq_id: PromptLogprobsWire(ids, [TokenLogprobsWire(*e) for e in entries], ranks)
                   for seq_id, ids, entries, ranks in prompt_logprobs}
        columns: dict[int, StepTokens] = {}
        for i, seq_id in enumerate(seq_ids):
            owner = self.owners.get(seq_id)
            if owner is None:                     # aborted meanwhile: nobody waits for its tokens
                continue
            request_id, index, cached, partition = owner
            msg = columns.get(partition)
            if msg is None:
                msg = columns[partition] = StepTokens(
                    step=step, request_ids=[], indexes=[], positions=[], token_ids=[], finish_reasons=[],
                    stop_reasons=[], num_cached_tokens=[], logprobs=[] if logprobs is not None else None,
                    on_host=on_host)
            msg.request_ids.append(request_id)
            msg.indexes.append(index)
            msg.positions.append(positions[i])
            msg.token_ids.append(token_ids[i])
            msg.finish_reasons.append(finish_reasons[i])
            msg.stop_reasons.append(stop_reasons[i])
            msg.num_cached_tokens.append(cached)
            msg.first_stamps.append(firsts.get(seq_id, []))
            if prompts:
                msg.prompt_logprobs.append(prompts.get(seq_id))
            if logprobs is not None:
                msg.logprobs.append(TokenLogprobsWire(*logprobs[i]))
        for partition, msg in columns.items():
            if not firsts:
                msg.first_stamps = []
            stream = self.names.tokens(partition)
            if stream not in self.trim.streams:          # a partition first written to: trimmed from now on
                self.trim.streams.append(stream)
            writes.append((stream, encode(msg), None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.publisher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get(REDIS_URL_ENV))
    parser.add_argument("--prefix", default="ps")
    parser.add_argument("--worker", default="w0")
    args = parser.parse_args(argv)
    if args.redis_url is None:
        parser.error(f"give --redis-url or set {REDIS_URL_ENV}")
    setup_logging("publisher")
    # It ends with its input: Ctrl-C at a terminal (sent to the whole process group) must not cut off what the
    # worker has handed over; the worker closing the pipe, or dying, ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Publisher(Transport(args.redis_url, args.prefix), args.worker).run(read_frames(sys.stdin.buffer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
