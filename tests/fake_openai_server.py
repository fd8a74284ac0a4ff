"""An OpenAI-compatible streaming server whose timing is known, for testing the serving benchmark.

    python tests/fake_openai_server.py --port 0 --ttft-ms 50 --itl-ms 10 --tokens-per-chunk 1,2

A raw asyncio HTTP/1.1 server (no framework, so its own overhead stays out of the way): each completion streams
`max_tokens` tokens, the first chunk `--ttft-ms` after the request arrived and the next ones every `--itl-ms`, with
`--tokens-per-chunk` tokens per chunk (cycling through the list), as chunked transfer encoding, one write per SSE
event, like uvicorn. Chunks are sent on a precise schedule (sleep, then spin the last 1.5 ms) and the instant of every
write is logged with time.perf_counter(), which is CLOCK_MONOTONIC and so the same clock in every process here: a
test compares what the client measured with what the server actually did. GET /log returns that log (and the
most streams that were in flight at once), POST /reset clears it.

The prompt (or the last message) can ask for trouble: "status:429" answers that status with a JSON error,
"error-after:2" sends an in-stream error event after 2 chunks, "close" answers without chunked encoding and ends
the body by closing the connection. A chat stream opens with an empty role chunk at once, as some servers do, so
a client that takes it for the first token is caught. With --itl-ms 0 the chunks go out as fast as the server can
write them (one write each, yielding between them); with --step-ms S every stream in flight sends its next chunk
every S ms, all in the same instant, as a batching engine does (the throughput test's source).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

MODEL = "fake-model"


class Server:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.per_chunk = [int(x) for x in args.tokens_per_chunk.split(",")]
        self.log: list[dict] = []
        self.active = 0
        self.max_active = 0
        self.chunks_sent = 0
        self.tick: asyncio.Future | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:                                   # keep-alive: requests one after another
                head = await reader.readuntil(b"\r\n\r\n")
                recv = time.perf_counter()
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in
                           (line.split(":", 1) for line in lines[1:] if ":" in line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self.route(method, path, headers, body, recv, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def route(self, method, path, headers, body, recv, writer) -> bool:
        """Answers one request; False when the connection must close."""
        if self.args.api_key and headers.get("authorization") != f"Bearer {self.args.api_key}":
            return self.reply(writer, 401, {"error": {"message": "bad api key", "code": 401}})
        if method == "GET" and path == "/v1/models":
            return self.reply(writer, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        if method == "POST" and path == "/reset":
            self.log.clear()
            self.max_active = self.chunks_sent = 0
            return self.reply(writer, 200, {})
        if method == "GET" and path == "/log":
            return self.reply(writer, 200, {"requests": self.log, "max_active": self.max_active,
                                            "chunks_sent": self.chunks_sent})
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            request = json.loads(body)
            if request.get("model") != MODEL:
                return self.reply(writer, 404, {"error": {"message": f"no model {request.get('model')}"}})
            chat = path.endswith("chat/completions")
            prompt = request["messages"][-1]["content"] if chat else request["prompt"]
            if prompt.startswith("status:"):
                status = int(prompt.split(":")[1].split()[0])
                return self.reply(writer, status, {"error": {"message": "asked for it", "code": status}})
            await self.stream(writer, request, prompt, chat, recv)
            return not prompt.startswith("close")
        return self.reply(writer, 404, {"error": {"message": f"no route {method} {path}"}})

    @staticmethod
    def reply(writer, status: int, payload: dict) -> bool:
        body = json.dumps(payload).encode()
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (status, len(body), body))
        return True

    async def stream(self, writer, request: dict, prompt: str, chat: bool, recv: float) -> None:
        args = self.args
        close = prompt.startswith("close")
        error_after = int(prompt.split(":")[1].split()[0]) if prompt.startswith("error-after:") else None
        max_tokens = request.get("max_tokens") or 16
        usage = (request.get("stream_options") or {}).get("include_usage", False) and not args.no_usage
        record = {"prompt": prompt, "recv": recv, "writes": [], "tokens": [], "max_tokens": max_tokens}
        self.log.append(record)
        self.active += 1
        self.max_active = max(self.max_active, self.active)

        def frame(payload: bytes) -> bytes:
            return payload if close else b"%x\r\n%s\r\n" % (len(payload), payload)

        def event(obj) -> bytes:
            return frame(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        head = {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": MODEL}
        if usage:
            head["usage"] = None
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                     + (b"connection: close\r\n\r\n" if close else b"transfer-encoding: chunked\r\n\r\n"))
        if chat:
            writer.write(event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None}]}))
        sent, k, made = 0, 0, {}
        try:
            while sent < max_tokens:
                if error_after is not None and k == error_after:
                    writer.write(event({"error": {"message": "the worker died", "code": 503}}))
                    break
                count = min(self.per_chunk[k % len(self.per_chunk)], max_tokens - sent)
                last = sent + count == max_tokens
                data = made.get((count, last))
                if data is None:                          # the same bytes each time: the server stays cheap
                    text = args.word * count
                    choice = ({"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text})
                    choice.update(logprobs=None, finish_reason="length" if last else None)
                    data = made[count, last] = event({**head, "choices": [choice]})
                if args.step_ms:
                    await self.next_step()
                else:
                    await self.wait_until(recv + (args.ttft_ms + k * args.itl_ms) / 1000)
                record["writes"].append(time.perf_counter())
                writer.write(data)
                record["tokens"].append(count)
                self.chunks_sent += 1
                sent += count
                k += 1
            else:
                if usage:
                    writer.write(event({**head, "choices": [], "usage": {
                        "prompt_tokens": len(prompt.split()), "completion_tokens": sent,
                        "total_tokens": len(prompt.split()) + sent}}))
            writer.write(event(b"[DONE]"))
            if not close:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.active -= 1
        if close:
            writer.close()

    async def next_step(self) -> None:
        """Like a batching engine: every --step-ms, each stream in flight sends its next chunk."""
        if self.tick is None:
            self.tick = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self.ticker())
        await self.tick

    async def ticker(self) -> None:
        step, due = self.args.step_ms / 1000, time.perf_counter()
        while True:
            due += step
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                due = time.perf_counter()                 # behind: carry on from now, no burst to catch up
            if not self.active:                           # idle: stop, the next stream starts a ticker again
                tick, self.tick = self.tick, None
                tick.set_result(None)
                return
            tick, self.tick = self.tick, asyncio.get_running_loop().create_future()
            tick.set_result(None)

    async def wait_until(self, target: float) -> None:
        if self.args.itl_ms == 0 and self.args.ttft_ms == 0:
            await asyncio.sleep(0)                        # as fast as it goes, streams interleaved
            return
        delay = target - time.perf_counter() - 0.0015
        if delay > 0:
            await asyncio.sleep(delay)
        while time.perf_counter() < target:               # the event loop's timers are ~1 ms coarse
            pass


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--itl-ms", type=float, default=10)
    parser.add_argument("--tokens-per-chunk", default="1")
    parser.add_argument("--step-ms", type=float, default=0,
                        help="instead of --ttft-ms/--itl-ms: every stream sends a chunk every STEP ms, together")
    parser.add_argument("--word", default=" the")
    parser.add_argument("--no-usage", action="store_true", help="ignore stream_options.include_usage")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    server = Server(args)
    tcp = await asyncio.start_server(server.handle, "127.0.0.1", args.port, backlog=1024)
    print(f"READY {tcp.sockets[0].getsockname()[1]}", flush=True)
    async with tcp:
        await tcp.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
