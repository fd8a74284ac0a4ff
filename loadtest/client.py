"""The streaming HTTP client of the serving benchmark: one request in, its chunks' arrival instants out.

A load generator must not be what limits the measurement, so this is a minimal HTTP/1.1 client written on
asyncio's Protocol interface rather than a general library: every read of the socket lands in `data_received`,
which takes one time.perf_counter() stamp, undoes chunked transfer encoding and splits the SSE events, keeping
each event's bytes beside the instant its last byte arrived. Nothing is parsed as JSON while a stream is live; the
events are read after the response ends (`read_openai_stream`), so the event loop gets back to the sockets at
once and the stamps stay close to the arrival. On the 2-core development machine one process takes in about
47,000 chunks/s from 64 streams (tests/test_loadtest_throughput.py prints the figure); httpx's streaming API
(aiter_lines, parsing each line) took in 16,000/s from the same server, under the 20,000 asked for.

Connections are kept alive and reused (one per request in flight, never capped: a cap would be a hidden
concurrency limit); a reused connection the server closed while idle is retried once on a new one, since
nothing was sent to the model. Only what an OpenAI-compatible server needs is spoken: no redirects, no
compression, no HTTP/2.
"""
from __future__ import annotations

import asyncio
import json
import socket
import ssl
from dataclasses import dataclass, field
from time import perf_counter
from urllib.parse import urlsplit

# Response parser states.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILERS, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


class StaleConnection(ConnectionError):
    """The server closed a kept-alive connection before answering on it: safe to retry."""


@dataclass
class Response:
    """One HTTP response as it arrived. For a 200 event stream, `events` holds (perf_counter instant, raw SSE
    event bytes without the blank line that ends it); otherwise `body` holds the body."""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, bytes]] = field(default_factory=list)
    body: bytes = b""
    end: float = 0.0                    # when the last byte of the response arrived

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: sends a request, parses its response as the bytes come."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.waiter: asyncio.Future | None = None
        self.response: Response | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.state == _UNTIL_CLOSE:                   # the body ends where the connection does
            self._finish(perf_counter())
        elif self.state == _HEAD and not self.buf and self.reused:
            self.waiter.set_exception(StaleConnection("the server closed the kept-alive connection"))
        else:
            self.waiter.set_exception(ConnectionError(f"connection lost mid-response: {exc or 'closed by peer'}"))

    def data_received(self, data: bytes) -> None:
        now = perf_counter()                             # the one stamp for everything in this read
        if self.waiter is None:
            return                                       # nothing asked: stray bytes after a response
        if self.state == _HEAD:
            data = self._head(data, now)
            if not data:
                return
        if self.state in (_SIZE, _DATA, _DATA_END, _TRAILERS):
            self._chunked(data, now)
        elif self.state == _LENGTH:
            take = data[:self.left]
            self.left -= len(take)
            self._body(take, now)
            if self.left == 0:
                self._finish(now)
        elif self.state == _UNTIL_CLOSE:
            self._body(data, now)

    # -- requests
    def send(self, request: bytes) -> asyncio.Future:
        self.response = Response()
        self.state, self.buf, self.sse, self.sse_buf, self.body_parts = _HEAD, b"", False, b"", []
        self.keep_alive = True
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def _head(self, data: bytes, now: float) -> bytes:
        """Parses the status line and headers; returns what follows them in `data`."""
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return b""
        lines = buf[:end].decode("latin-1").split("\r\n")
        rest, self.buf = buf[end + 4:], b""
        version, status = lines[0].split(" ", 2)[:2]
        response = self.response
        response.status = int(status)
        if 100 <= response.status < 200:                 # an interim response: the real one follows
            return self._head(rest, now) if rest else b""
        headers = response.headers
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in connection
        self.sse = response.status == 200 and headers.get("content-type", "").startswith("text/event-stream")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = _SIZE
        elif "content-length" in headers:
            self.state, self.left = _LENGTH, int(headers["content-length"])
            if self.left == 0:
                self._finish(now)
                return b""
        else:
            self.state, self.keep_alive = _UNTIL_CLOSE, False
        return rest

    def _chunked(self, data: bytes, now: float) -> None:
        """Undoes chunked transfer encoding: size line, data, CRLF, ..., a zero size, trailers, blank line."""
        buf = self.buf + data if self.buf else data
        pos, end, parts = 0, len(buf), []
        state = self.state
        while pos < end:
            if state == _DATA:
                take = min(self.left, end - pos)
                parts.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if self.left:
                    break
                state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                pos += 2                                 # the CRLF after a chunk's data
                state = _SIZE
            else:                                        # _SIZE or _TRAILERS: one line at a time
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line, pos = buf[pos:eol], eol + 2
                if state == _TRAILERS:
                    if not line:
                        state = _DONE
                        break
                    continue
                self.left = int(line.split(b";", 1)[0], 16)
                state = _DATA if self.left else _TRAILERS
        self.state = state
        self.buf = buf[pos:] if pos < end else b""
        if parts:
            self._body(parts[0] if len(parts) == 1 else b"".join(parts), now)
        if state == _DONE:
            self._finish(now)

    def _body(self, data: bytes, now: float) -> None:
        if not self.sse:
            self.body_parts.append(data)
            return
        # SSE: events end with a blank line. Lines may end in CRLF; they are normalized to LF, holding back a
        # trailing CR until the next read says whether an LF follows it.
        buf = self.sse_buf + data if self.sse_buf else data
        if b"\r" in buf:
            hold = buf.endswith(b"\r")
            buf = (buf[:-1] if hold else buf).replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if hold else b"")
        events, pos = self.response.events, 0
        while (i := buf.find(b"\n\n", pos)) >= 0:
            if i > pos:
                events.append((now, buf[pos:i]))
            pos = i + 2
        self.sse_buf = buf[pos:] if pos else buf

    def _finish(self, now: float) -> None:
        response = self.response
        response.end = now
        if self.sse and self.sse_buf.strip():
            response.events.append((now, self.sse_buf))   # an event cut off by the end of the body
        response.body = b"".join(self.body_parts)
        self.state, self.response = _DONE, None
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result(response)
        if not self.keep_alive:
            self.transport.close()


class HTTPClient:
    """Requests to one server over a pool of kept-alive connections."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float | None = None):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"base URL must be http:// or https://, got {base_url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        default_port = (url.scheme == "https" and self.port == 443) or (url.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []

    def request_bytes(self, method: str, path: str, body: bytes = b"", accept: str = "application/json") -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}", f"Accept: {accept}",
                 "User-Agent: pagestream-bench"]
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        return conn

    async def send(self, request: bytes) -> Response:
        """Sends prepared request bytes; returns the whole response (its events stamped as they came)."""
        for attempt in range(2):
            conn = await self._connection()
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await conn.send(request)
            except StaleConnection:
                if attempt == 0:
                    continue
                raise
            except BaseException:                         # timeout, cancellation: the connection is in no state
                conn.transport.abort()                    # to be reused
                raise
            if not conn.closed and conn.keep_alive:
                self._idle.append(conn)
            return response
        raise AssertionError("unreachable")

    async def get_json(self, path: str) -> dict:
        response = await self.send(self.request_bytes("GET", path))
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}: {response.text[:300]}")
        return json.loads(response.body)

    def close(self) -> None:
        for conn in self._idle:
            conn.transport.close()
        self._idle.clear()


# ---- OpenAI streams --------------------------------------------------------------------------------------------
@dataclass
class RequestOutput:
    """What one benchmark request did. Times are perf_counter seconds; latencies are seconds."""
    prompt_len: int                       # the dataset's count of prompt tokens
    output_len: int                       # max_tokens asked for
    success: bool = False
    error: str = ""
    start: float = 0.0                    # when it was sent (before taking a connection)
    ttft: float | None = None             # start -> the first chunk with generated text
    itl: list[float] = field(default_factory=list)    # between consecutive chunks with text (a chunk may
    e2el: float = 0.0                     # start -> the end of the response             hold several tokens)
    chunks: int = 0                       # chunks with generated text
    text: str = ""
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    output_tokens: int = 0                # counted: the server's usage, else the tokenizer (see serve.py)
    tokens_from: str = ""                 # "usage" or "tokenizer"


_scan_json = json.JSONDecoder().scan_once      # the C scanner itself: half the cost of json.loads per chunk


def _json(payload: bytes):
    try:
        return _scan_json(payload.decode("utf-8"), 0)[0]
    except StopIteration:
        raise ValueError(f"not JSON: {payload[:80]!r}") from None


def read_openai_stream(response: Response, out: RequestOutput, chat: bool) -> None:
    """Fills `out` from an OpenAI-style event stream: text chunks (choices[0].text, or .delta.content and
    .delta.reasoning_content for chat), a usage chunk, an error event, and [DONE].

    The first token is the first chunk that carries text: a chat stream's opening role chunk (empty content)
    does not count, nor do chunks with only a finish_reason."""
    times, pieces = [], []
    for at, raw in response.events:
        if raw.startswith(b"id:"):                     # a resumable stream's event: its id, then its data
            raw = raw[raw.find(b"\n") + 1:]
        if raw.startswith(b"data: ") and b"\n" not in raw:
            payload = raw[6:]
        else:                                          # the general form: several fields, comments, data lines
            data = [line[5:].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
            if not data:
                continue
            payload = b"\n".join(data)
        if payload == b"[DONE]":
            continue
        obj = _json(payload)
        if type(obj) is not dict:
            continue
        choices = obj.get("choices")
        if choices:
            choice = choices[0]
            if chat:
                delta = choice.get("delta")
                text = delta and ((delta.get("content") or "") + (delta.get("reasoning_content") or ""))
            else:
                text = choice.get("text")
            if text:
                times.append(at)
                pieces.append(text)
        elif obj.get("error"):
            error = obj["error"]
            out.error = f"error event: {error.get('message', error) if isinstance(error, dict) else error}"
            break
        usage = obj.get("usage")
        if usage:
            out.usage_prompt_tokens = usage.get("prompt_tokens")
            out.usage_completion_tokens = usage.get("completion_tokens")
    out.chunks = len(times)
    out.text = "".join(pieces)
    out.e2el = response.end - out.start
    if times:
        out.ttft = times[0] - out.start
        out.itl = [b - a for a, b in zip(times, times[1:])]
    if not out.error:
        out.success = bool(response.events)
        if not out.success:
            out.error = "the stream ended with no events"


class OpenAIStreamClient:
    """Streams completions or chat completions from one server and measures each request."""

    def __init__(self, http: HTTPClient, endpoint: str, model: str, *, include_usage: bool = True,
                 ignore_eos: bool = False, temperature: float | None = 0.0, extra_body: dict | None = None):
        self.http, self.endpoint = http, endpoint
        self.chat = endpoint.rstrip("/").endswith("chat/completions")
        self.base = {"model": model, "stream": True, **({"temperature": temperature} if temperature is not None
                                                         else {})}
        if include_usage:
            self.base["stream_options"] = {"include_usage": True}
        if ignore_eos:
            self.base["ignore_eos"] = True               # a vLLM / SGLang / pagestream extension
        self.base.update(extra_body or {})

    def body(self, prompt: str, max_tokens: int) -> bytes:
        request = dict(self.base, max_tokens=max_tokens)
        if self.chat:
            request["messages"] = [{"role": "user", "content": prompt}]
        else:
            request["prompt"] = prompt
        return json.dumps(request).encode()

    async def generate(self, prompt: str, prompt_len: int, output_len: int) -> RequestOutput:
        """Never raises for what the server or network does: a failure is recorded in the output."""
        request = self.http.request_bytes("POST", self.endpoint, self.body(prompt, output_len),
                                          accept="text/event-stream")
        out = RequestOutput(prompt_len=prompt_len, output_len=output_len)
        out.start = perf_counter()
        try:
            response = await self.http.send(request)
        except TimeoutError:
            out.error, out.e2el = f"timed out after {self.http.timeout_s} s", perf_counter() - out.start
            return out
        except (OSError, ValueError) as e:               # refused, reset, unparseable response
            out.error, out.e2el = f"{type(e).__name__}: {e}", perf_counter() - out.start
            return out
        if response.status != 200:
            out.error = f"HTTP {response.status}: {response.text[:300]}"
            out.e2el = response.end - out.start
            return out
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            out.error = f"not an event stream: {response.headers.get('content-type')!r}: {response.text[:200]}"
            return out
        try:
            read_openai_stream(response, out, self.chat)
        except ValueError as e:                           # a chunk that is not JSON
            out.success, out.error = False, f"unreadable chunk: {e}"
        return out
