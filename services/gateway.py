"""The HTTP gateway: the OpenAI API (with vLLM's extensions) over the pipeline, plus health, metrics and a chat page.

    pagestream service gateway --redis-url redis://... [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--grpc-port P]

An API request becomes one pipeline request per prompt (PipelineClient.generate); their ReplyItems become the
response (openai_protocol.ResponseBuilder), as server-sent events or whole. The first item is awaited before the
response starts, so an error found early (a prompt too long, a full queue, the pipeline down) gets its HTTP status;
a later one becomes an error event. A client that goes away has its request aborted at once (until_disconnected),
so its KV blocks are freed within a plan. Every event has an id; a client whose stream broke (its gateway died)
sends the request again with Last-Event-ID, to any gateway, and the stream goes on where it broke
(services/resumable.py). The gRPC server (services/grpc_server.py) runs in the same event loop,
on the same PipelineClient.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import logging
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, TypeVar

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from schemas.messages import ErrorInfo, ReplyItem
from services.metrics import (CONTENT_TYPE, Counter, Gauge, GatewayMetrics, PipelineScraper, exposition,
                              peer_gateway_stats, publish_gateway_stats)
from services.openai_protocol import (ERROR_TYPES, MODEL_NOT_FOUND, SSE_DONE, Limits, ParsedRequest, ProtocolError,
                                      ResponseBuilder,
                                      TokenText, decode_json_body, error_body, model_card, models_list,
                                      openapi_schema, parse_chat, parse_completion, parse_detokenize, parse_tokenize,
                                      pipeline_error_body, sse)
from services.pipeline_client import Overloaded, PipelineClient, StreamGone, Unavailable
from services.reasoning import REASONING_PARSERS
from services.resumable import StreamPosition, parse_event_id
from services.tool_calls import TOOL_CALL_PARSERS

log = logging.getLogger("pagestream.gateway")

MIB = 1 << 20
STATIC_DIR = Path(__file__).parent / "static"
CLIENT_GONE = 499                    # nginx's status for a client that closed the connection first
ADMISSION_STATUS = {Overloaded: 429, Unavailable: 503, StreamGone: 404}
GRACEFUL_SHUTDOWN_S = 10.0

KIB = 1 << 10
T = TypeVar("T")
# (prompt index, the items that came in together: PipelineClient.generate) of one API request
Stream = AsyncGenerator[tuple[int, list[ReplyItem]], None]


@dataclass
class HttpLimits:
    """What one client may hold of the HTTP server."""
    header_timeout_s: float = 10.0        # from a connection's start, or its last response, to a whole request head
    keep_alive_s: float = 5.0             # idle between requests, then the connection is closed
    max_concurrency: int | None = 2048    # connections or requests in progress beyond which requests get 503
    max_header_bytes: int = 16 * KIB      # a request head still incomplete past this size gets 400 (h11 measures
                                          # only heads not yet whole: one read, up to 256 KiB, may bring more)


@dataclass
class GatewaySettings:
    """What the HTTP and gRPC front ends share."""
    served_model_name: str
    model: str                                                  # --model: the served model's root
    api_keys: list[str] = field(default_factory=list)           # empty: no authentication
    metrics_keys: list[str] = field(default_factory=list)       # /metrics' own keys; empty: the API keys
    max_n: int = 16
    max_body_bytes: int = 4 * MIB
    max_model_len: int | None = None
    sampling_defaults: dict[str, float] = field(default_factory=dict)   # for the fields a request leaves out
    tool_call_parser: str = "hermes"                            # how the model writes tool calls
    reasoning_parser: str | None = None                         # how it writes its thinking (None: as content)
    token_text: TokenText = field(default_factory=TokenText)    # token strings for logprobs
    # The tokenizer services' input path, for /tokenize and /detokenize (None: the model has no tokenizer here)
    input_processor: Any = None                                 # engine.input_processor.InputProcessor
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    http: HttpLimits = field(default_factory=HttpLimits)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def limits(self) -> Limits:
        return Limits(self.served_model_name, self.max_n, self.max_model_len, self.sampling_defaults,
                      self.tool_call_parser, self.reasoning_parser)


# ---- the client going away -------------------------------------------------------------------------------------
class ClientDisconnected(Exception):
    pass


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Awaits work unless the client disconnects first: then work is cancelled, its cleanup (a pipeline stream's:
    the abort) runs to its end, and ClientDisconnected is raised. Needed because uvicorn neither cancels a handler
    nor fails its sends when the client leaves; it only tells receive()."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class EventStream(StreamingResponse):
    """text/event-stream from an async generator of events, which is always closed (aclose) when the response
    ends: finished, failed, or the client gone (a pipeline stream, closed, aborts its request)."""
    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self.stream_response(send))
        except (ClientDisconnected, OSError):
            pass                                            # nobody is left to tell
        finally:
            await self.body_iterator.aclose()


# ---- pipeline streams ------------------------------------------------------------------------------------------
async def _just_done() -> AsyncGenerator[bytes, None]:
    yield SSE_DONE


async def merge(streams: list[AsyncIterator[list[ReplyItem]]]) -> Stream:
    """The item batches of several pipeline requests (one per prompt) as they come, tagged with their prompt's
    index. Closing this closes them all, which aborts those not finished. Overloaded/Unavailable propagate."""
    if len(streams) == 1:                                   # the common case: no tasks, no queue
        only = streams[0]
        try:
            async for items in only:
                yield 0, items
        finally:
            await only.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[list[ReplyItem]]) -> None:
        try:
            async for items in stream:
                queue.put_nowait((index, items))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, got = await queue.get()
            if got is None:
                open_streams -= 1
            elif isinstance(got, Exception):
                raise got
            else:
                yield index, got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Timing:
    """One API request's latencies: to its first token, between each completion's token deltas, to its end."""
    __slots__ = ("metrics", "start", "first", "last")

    def __init__(self, metrics: GatewayMetrics, start: float):
        self.metrics, self.start = metrics, start
        self.first: float | None = None
        self.last: dict[tuple[int, int], float] = {}

    def item(self, prompt_index: int, item: ReplyItem) -> None:
        if not item.token_ids:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.time_to_first_token.observe(now - self.start)
        key = (prompt_index, item.index)
        last = self.last.get(key)
        if last is not None:
            self.metrics.inter_token_latency.observe(now - last)
        self.last[key] = now

    def delivered(self, item: ReplyItem, to_client: bool) -> None:
        """The item's text was written to the client (to_client), or will go out with the whole response."""
        if item.stamps:
            self.metrics.observe_hops(item.stamps + [time.time()], to_client)

    def done(self) -> None:
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.start)


class _Untimed(_Timing):
    """A resumed stream's: its latencies were the first connection's, and are not measured again."""

    def __init__(self):
        pass

    def item(self, prompt_index: int, item: ReplyItem) -> None:
        pass

    def delivered(self, item: ReplyItem, to_client: bool) -> None:
        pass

    def done(self) -> None:
        pass


def _error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed limit: from Content-Length, else while reading."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the request body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the API ---------------------------------------------------------------------------------------------------
class Api:
    def __init__(self, client: PipelineClient, settings: GatewaySettings):
        self.client, self.settings = client, settings
        self.metrics = settings.metrics
        # The reply stream's lag needs the id of the last entry the client read (PipelineClient.last_reply_id);
        # a client that does not keep it leaves that one stream out of /metrics.
        self.scraper = PipelineScraper(client.redis, client.names, client.reply_stream,
                                       lambda: getattr(client, "last_reply_id", None))

    # -- generation --
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        start, arrival = time.monotonic(), time.time()    # arrival: before the body is read (the first hop's start)
        try:
            body = decode_json_body(await read_body(request, self.settings.max_body_bytes))
            parsed = (parse_chat(body, self.settings.limits) if chat
                      else parse_completion(body, self.settings.limits, self.settings.token_text))
            last_event_id = request.headers.get("last-event-id")
            if last_event_id is not None:
                return await self._resume(request, parsed, last_event_id)
        except ProtocolError as e:
            return self._refuse(e.status, e.body(), {"Connection": "close"} if e.status == 413 else None)
        except ClientDisconnect:
            return self._refuse(CLIENT_GONE, error_body("the client disconnected", CLIENT_GONE))
        response_id = self.client.new_request_id("chatcmpl" if chat else "cmpl")
        stream = merge([self.client.generate(r) for r in parsed.generate_requests(response_id, arrival)])
        return await self._respond(request, parsed, response_id, stream, _Timing(self.metrics, start))

    async def _resume(self, request: Request, parsed: ParsedRequest, last_event_id: str) -> Response:
        """The same request again, with the id of the last event its client got: the rest of that stream."""
        try:
            event = parse_event_id(last_event_id)
        except ValueError as e:
            raise ProtocolError(str(e), param="Last-Event-ID") from None
        if not parsed.stream:
            raise ProtocolError("Last-Event-ID resumes a stream: send the request with stream set to true",
                                param="stream")
        num_choices = parsed.num_prompts * parsed.params.n
        if event.cursor is not None and len(event.cursor) != num_choices:
            raise ProtocolError(f"Last-Event-ID is an event of a stream of {len(event.cursor)} choices; this "
                                f"request makes {num_choices}", param="Last-Event-ID")
        if event.cursor is None:                             # the client had it all but the end
            return EventStream(_just_done())
        stream = merge([self.client.resume(event.gateway, rid, parsed.params.n, event.since)
                        for rid in parsed.request_ids(event.response_id)])
        position = StreamPosition(event.response_id, event.since, num_choices, seen=event.cursor)
        return await self._respond(request, parsed, event.response_id, stream, _Untimed(), position)

    async def _respond(self, request: Request, parsed: ParsedRequest, response_id: str, stream: Stream,
                       timing: _Timing, position: StreamPosition | None = None) -> Response:
        """The response, once the first item is in: an error status if that is an error, else the events or
        the whole body."""
        try:
            first = await until_disconnected(request.receive, anext(stream))
        except (Overloaded, Unavailable, StreamGone) as e:
            await stream.aclose()
            return self._refuse(ADMISSION_STATUS[type(e)], error_body(str(e), ADMISSION_STATUS[type(e)]))
        except ClientDisconnected:
            return self._refuse(CLIENT_GONE, error_body("the client disconnected", CLIENT_GONE))
        error = first[1][0].error
        if error is not None:
            await stream.aclose()
            return self._refuse(error.code, pipeline_error_body(error))
        builder = ResponseBuilder(parsed, response_id, int(time.time()), self.settings.token_text)
        if parsed.stream:
            if position is None:
                since = self.client.first_reply_entry(parsed.request_ids(response_id))
                position = StreamPosition(response_id, since or "0-0", len(builder.choices))
            return EventStream(self._events(builder, timing, position, first, stream))
        try:
            return await until_disconnected(request.receive, self._collect(builder, timing, first, stream))
        except ClientDisconnected:
            return Response(status_code=CLIENT_GONE)

    async def _events(self, builder: ResponseBuilder, timing: _Timing, position: StreamPosition,
                      first: tuple[int, list[ReplyItem]], stream: Stream) -> AsyncGenerator[bytes, None]:
        status = CLIENT_GONE                                 # unless the stream gets to its end
        try:
            if not position.resumed:
                for chunk in builder.start():
                    yield sse(chunk, position.event_id())
            batch: tuple[int, list[ReplyItem]] | None = first
            while batch is not None:
                prompt_index, items = batch
                events: list[bytes] = []
                taken: list[ReplyItem] = []
                error = None
                for item in items:
                    if item.error is not None:
                        error = item.error
                        break
                    chunks = builder.add_chunks(prompt_index, item)
                    if position.take(builder.choice_index(prompt_index, item), item.seq):   # not seen before
                        timing.item(prompt_index, item)
                        taken.append(item)
                        if chunks:          # an item's chunks under one id: resumed as one
                            events += [sse(c) for c in chunks[:-1]] + [sse(chunks[-1], position.event_id())]
                if events:                  # the items that came in together, in one write
                    yield b"".join(events)
                for item in taken:
                    timing.delivered(item, to_client=True)
                if error is not None:
                    status = error.code
                    yield sse(pipeline_error_body(error))
                    break
                batch = await self._next(stream, builder)
            else:
                status = 200
                timing.done()
                if builder.request.include_usage:
                    yield sse(builder.usage_chunk(), position.done_id())
            yield SSE_DONE
        finally:
            await stream.aclose()
            self._count(status, builder)

    async def _collect(self, builder: ResponseBuilder, timing: _Timing, first: tuple[int, list[ReplyItem]],
                       stream: Stream) -> Response:
        status = CLIENT_GONE
        try:
            batch: tuple[int, list[ReplyItem]] | None = first
            while batch is not None:
                prompt_index, items = batch
                for item in items:
                    if item.error is not None:
                        status = item.error.code
                        return _error_response(status, pipeline_error_body(item.error))
                    timing.item(prompt_index, item)
                    builder.add(prompt_index, item)
                    timing.delivered(item, to_client=False)
                batch = await self._next(stream, builder)
            status = 200
            timing.done()
            return JSONResponse(builder.response())
        finally:
            await stream.aclose()
            self._count(status, builder)

    @staticmethod
    async def _next(stream: Stream, builder: ResponseBuilder) -> tuple[int, list[ReplyItem]] | None:
        """The next batch of items, None at the end. Overloaded/Unavailable (only a later prompt's request can
        raise them here) become an error item."""
        try:
            return await anext(stream, None)
        except (Overloaded, Unavailable) as e:
            code = ADMISSION_STATUS[type(e)]
            error = ErrorInfo(str(e), type=ERROR_TYPES[code], code=code)
            return 0, [ReplyItem(request_id=builder.response_id, error=error)]

    def _refuse(self, status: int, body: dict, headers: dict | None = None) -> Response:
        self.metrics.requests.inc(status=status)
        return _error_response(status, body, headers)

    def _count(self, status: int, builder: ResponseBuilder) -> None:
        self.metrics.requests.inc(status=status)
        self.metrics.generation_tokens.inc(builder.completion_tokens)
        self.metrics.prompt_tokens.inc(sum(builder.prompt_tokens))

    # -- tokens --
    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: the prompt's token ids as a completion (or, with messages, a chat request) gets them,
        through the same input processor as the tokenizer services."""
        async def answer() -> dict:
            parsed = parse_tokenize(await self._body(request), self.settings.limits)
            processor = self._input_processor()
            ids = await asyncio.to_thread(processor.tokenize, parsed.prompt, None, parsed.messages,
                                          parsed.add_special_tokens, parsed.add_generation_prompt)
            result = {"count": len(ids), "max_model_len": await self._max_model_len() or processor.max_model_len,
                      "tokens": ids}
            if parsed.return_token_strs:
                result["token_strs"] = processor.tokenizer.token_strings(ids)
            return result
        return await self._token_endpoint(answer)

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: token ids back to text (special tokens included)."""
        async def answer() -> dict:
            ids = parse_detokenize(await self._body(request), self.settings.limits)
            processor = self._input_processor()
            bad = [t for t in ids if t >= processor.vocab_size]
            if bad:
                raise ProtocolError(f"tokens must be in [0, {processor.vocab_size}) (the model's vocabulary), got "
                                    f"{bad[:5]}", param="tokens")
            text = await asyncio.to_thread(processor.tokenizer.decode, ids, False)
            return {"prompt": text}
        return await self._token_endpoint(answer)

    async def _body(self, request: Request) -> dict:
        return decode_json_body(await read_body(request, self.settings.max_body_bytes))

    def _input_processor(self):
        processor = self.settings.input_processor
        if processor is None or processor.tokenizer is None:
            raise ProtocolError("this server has no tokenizer for its model (dummy weights without --tokenizer, or "
                                "--tokenizer none)")
        return processor

    async def _token_endpoint(self, answer) -> Response:
        try:
            return JSONResponse(await answer())
        except ProtocolError as e:
            return _error_response(e.status, e.body(), {"Connection": "close"} if e.status == 413 else None)
        except ValueError as e:                     # the input processor's refusals (a chat template's, say)
            return _error_response(400, error_body(str(e), 400))
        except ClientDisconnect:
            return _error_response(CLIENT_GONE, error_body("the client disconnected", CLIENT_GONE))

    # -- everything else --
    async def _max_model_len(self) -> int | None:
        """The context length the engine serves: the worker's, as it registered it (from --max-model-len or the
        model's config), else --max-model-len as given here (None: no worker registered, and no flag)."""
        info = await self.client.worker_info()
        return info.max_model_len if info is not None else self.settings.max_model_len

    async def models(self, request: Request) -> Response:
        s = self.settings
        return JSONResponse(models_list(s.served_model_name, s.model, s.created, await self._max_model_len()))

    async def model(self, request: Request) -> Response:
        s, name = self.settings, request.path_params["model"]
        if name != s.served_model_name:
            return _error_response(404, error_body(f"The model `{name}` does not exist.", 404, MODEL_NOT_FOUND,
                                                   "model"))
        return JSONResponse(model_card(s.served_model_name, s.model, s.created, await self._max_model_len()))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        ok = await self.client.ready()
        return JSONResponse({"status": "ready" if ok else "not ready", "pending": self.client.num_pending},
                            status_code=200 if ok else 503)

    async def metrics_text(self, request: Request) -> Response:
        pending = Gauge("pagestream_gateway_pending_requests", "Pipeline requests this gateway has in flight.")
        pending.set(self.client.num_pending)
        checks = Counter("pagestream_gateway_readiness_checks_total", "Readiness probes this gateway sent through "
                         "the pipeline; every /health/ready caller within a second shares one.")
        checks.inc(self.client.readiness_checks)
        try:
            peers = await peer_gateway_stats(self.client.redis, self.client.names, self.client.gateway_id)
        except Exception as e:                       # Redis down: this gateway's own figures still answer
            log.warning("could not read the other gateways' metrics: %s", e)
            peers = []
        metrics = self.metrics.merged(peers) + [pending, checks] + await self.scraper.collect()
        return Response(exposition(metrics), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        s = self.settings
        limits = replace(s.limits, max_model_len=await self._max_model_len())
        return JSONResponse(openapi_schema(limits, bool(s.api_keys), bool(s.metrics_keys or s.api_keys)))

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")


class ApiKeyAuth:
    """Authorization: Bearer <key>, checked before the body is read. The API (/v1/..., and its schema,
    /openapi.json) takes an API key. /metrics takes a metrics key where there are any (a scraper's own, which
    opens nothing else), else an API key: it tells load, models and queue lengths to whoever reads it. The page
    and health stay open."""

    def __init__(self, app: ASGIApp, api_keys: list[str], metrics_keys: list[str]):
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.metrics_keys = [k.encode() for k in metrics_keys] or self.api_keys

    def _keys(self, path: str) -> list[bytes]:
        """The keys that open path; none: it is open."""
        if path.startswith("/v1/") or path in ("/openapi.json", "/tokenize", "/detokenize"):
            return self.api_keys
        if path == "/metrics":
            return self.metrics_keys
        return []

    @staticmethod
    def _authorized(scope: Scope, keys: list[bytes]) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest against every key: the time taken says nothing about which key nearly matched
        return scheme.lower() == b"bearer" and any([hmac.compare_digest(token.strip(), k) for k in keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self._keys(scope["path"]) if scope["type"] == "http" else []
        if keys and not self._authorized(scope, keys):
            response = _error_response(401, error_body("invalid or missing API key (Authorization: Bearer <key>)",
                                                       401), {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class EchoRequestId:
    """A client's X-Request-Id comes back as a response header, to trace a request through the client's own logs.
    It is never an id of ours: requests are keyed by the ids the gateway makes (PipelineClient.new_request_id),
    and the responses' ids are those, so clients sending the same X-Request-Id, by chance or on purpose, cannot
    reach each other's requests. Only a short run of visible ASCII is echoed."""
    MAX_BYTES = 128

    def __init__(self, app: ASGIApp):
        self.app = app

    @classmethod
    def traceable(cls, value: bytes) -> bool:
        return 0 < len(value) <= cls.MAX_BYTES and all(0x21 <= b <= 0x7E for b in value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None) \
            if scope["type"] == "http" else None
        if given is None or not self.traceable(given):
            await self.app(scope, receive, send)
            return

        async def send_echoing(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", given)]}
            await send(message)

        await self.app(scope, receive, send_echoing)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown paths (404) and methods (405), in OpenAI's error shape too."""
    return _error_response(exc.status_code, error_body(exc.detail, exc.status_code), exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after this answer, and uvicorn logs it with its traceback.
    return _error_response(500, error_body("internal server error", 500))


def build_app(client: PipelineClient, settings: GatewaySettings) -> Starlette:
    api = Api(client, settings)
    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/tokenize", api.tokenize, methods=["POST"]),
        Route("/detokenize", api.detokenize, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/health/ready", api.ready, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/", api.index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(EchoRequestId)]                  # outermost: a 401 carries the id too
    if settings.api_keys or settings.metrics_keys:
        middleware.append(Middleware(ApiKeyAuth, api_keys=settings.api_keys, metrics_keys=settings.metrics_keys))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.settings = settings
    return app


# ---- HTTP connections ------------------------------------------------------------------------------------------
class H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request head. uvicorn 0.54 has none: its keep-alive timer
    is armed only after a response, and any byte that arrives cancels it, so a client that opens connections and
    sends a header line now and then (slowloris) would hold each of them, and a slot under max_concurrency, for
    ever. The deadline runs from the connection's start, and from each response's end, until a whole request
    head has arrived; past it the connection is closed."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None

    def _await_head(self) -> None:
        """Arms the deadline if no request head is being read or served; disarms it once one has arrived."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)
        elif not waiting and self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_slow(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:   # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()            # may already start on a pipelined request
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        super().connection_lost(exc)


def apply_http_limits(config: uvicorn.Config, limits: HttpLimits) -> None:
    """limits on a uvicorn Config not yet loaded. The protocol is h11 (uvicorn's default without httptools),
    with the header deadline added."""
    config.http = functools.partial(H11WithHeaderTimeout, header_timeout_s=limits.header_timeout_s)
    config.timeout_keep_alive = limits.keep_alive_s
    config.limit_concurrency = limits.max_concurrency
    config.h11_max_incomplete_event_size = limits.max_header_bytes


# ---- the service -----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway")
    # Loopback unless asked: a server anyone on the network can reach is a choice (compose.yaml makes it, for its
    # container).
    group.add_argument("--host", default="127.0.0.1", help="the address the HTTP and gRPC APIs listen on")
    group.add_argument("--port", type=int, default=8000, help="the HTTP API's port")
    group.add_argument("--grpc-port", type=int, default=None, help="serve the gRPC API on this port (default: no gRPC)")
    group.add_argument("--api-key", action="append", default=[], dest="api_key",
                       help="a key clients must send as 'Authorization: Bearer <key>' (repeatable); none: no auth")
    group.add_argument("--max-pending", type=int, default=1024,
                       help="pipeline requests in flight before new ones get 429")
    group.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    group.add_argument("--max-body-bytes", type=int, default=4 * MIB, help="larger request bodies get 413")
    group.add_argument("--max-n", type=int, default=16, help="the largest n (completions per prompt) accepted")
    group.add_argument("--tool-call-parser", default="hermes", choices=sorted(TOOL_CALL_PARSERS),
                       help="the format the model writes tool calls in, parsed out of chat outputs when a request "
                            "offers tools (hermes: <tool_call>...</tool_call>, as Qwen and Hermes write them)")
    group.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="split a reasoning model's <think>...</think> from its answer: chat responses carry it "
                            "as reasoning_content (default: none, the thinking stays in the content)")
    group.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)   # a listening socket from serve
    group.add_argument("--metrics-key", action="append", default=[], dest="metrics_key",
                       help="a key Prometheus sends as 'Authorization: Bearer <key>' to read /metrics (repeatable); "
                            "none: /metrics takes the --api-key keys, and is open where there are none")
    limits = HttpLimits()
    group.add_argument("--timeout-header", type=float, default=limits.header_timeout_s,
                       help="seconds a client has, from connecting or from its last response, to send a whole "
                            "request head before the connection is closed (against slow-header clients)")
    group.add_argument("--timeout-keep-alive", type=float, default=limits.keep_alive_s,
                       help="seconds an idle kept-alive connection stays open")
    group.add_argument("--limit-concurrency", type=int, default=limits.max_concurrency,
                       help="connections or requests in progress (per gateway process) beyond which new requests "
                            "get 503")
    group.add_argument("--max-header-bytes", type=int, default=limits.max_header_bytes,
                       help="a request head (request line and headers) still incomplete past this size gets 400")


def _model_files(model: str, load_format: str):
    """The served model's files (engine.model_files), or None where this process cannot resolve them."""
    from engine.model_files import resolve_model
    try:
        return resolve_model(model, load_format, progress=False)
    except (ValueError, OSError) as e:
        log.warning("cannot resolve %s here (%s): logprobs show token ids, sampling takes OpenAI's defaults",
                    model, e)
        return None


def _tokenizer(files, tokenizer: str | None):
    """The model's tokenizer (engine.tokenizer), for the token strings of logprobs, echo of token prompts and
    /tokenize; None without one (logprobs then show tokens as token_id:<id>)."""
    from engine.tokenizer import load_tokenizer
    try:
        return load_tokenizer(files, tokenizer) if files is not None else None
    except (ValueError, OSError) as e:
        log.warning("no tokenizer for %s (%s): logprobs show token ids", files.name, e)
    return None


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    from engine.input_processor import InputProcessor
    from engine.model_files import resolve_max_model_len, sampling_defaults
    files = _model_files(args.model, args.load_format)
    tokenizer = _tokenizer(files, args.tokenizer)
    # As the tokenizer services build theirs (services/tokenizer.py): /tokenize sees what a request would.
    processor = None if files is None else InputProcessor(
        tokenizer, resolve_max_model_len(files.config, args.max_model_len), files.config["vocab_size"])
    return GatewaySettings(served_model_name=args.served_model_name or args.model, model=args.model,
                           api_keys=list(args.api_key), metrics_keys=list(args.metrics_key), max_n=args.max_n,
                           max_body_bytes=args.max_body_bytes, max_model_len=args.max_model_len,
                           http=HttpLimits(args.timeout_header, args.timeout_keep_alive, args.limit_concurrency,
                                           args.max_header_bytes),
                           sampling_defaults=sampling_defaults(files) if files is not None else {},
                           token_text=TokenText(tokenizer) if tokenizer is not None else TokenText(),
                           input_processor=processor, tool_call_parser=args.tool_call_parser,
                           reasoning_parser=args.reasoning_parser)


class _Server(uvicorn.Server):
    """uvicorn's Server, except that the app's HttpLimits apply (they come with the app built by build_app, from
    its GatewaySettings), and SIGINT/SIGTERM only make it stop. uvicorn re-raises the signal once serving ends,
    which under Python's default SIGTERM handler kills the process before the gRPC server and the pipeline client
    are closed."""

    def __init__(self, config: uvicorn.Config):
        apply_http_limits(config, config.app.state.settings.http)
        super().__init__(config)

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def _start_grpc(client: PipelineClient, settings: GatewaySettings, host: str, port: int,
                      shared: bool) -> Any:
    try:
        from services import grpc_server
    except ImportError as e:
        log.warning("the gRPC API is off: %s", e)
        return None
    try:
        server = await grpc_server.start(client, settings, port, host, shared=shared)
    except RuntimeError as e:                   # grpc's way of saying the address could not be bound
        raise SystemExit(f"cannot serve gRPC on {host}:{port} (--host/--grpc-port): {e}") from None
    log.info("gRPC API on %s:%d", host, port)
    return server


async def serve(args: argparse.Namespace, settings: GatewaySettings) -> None:
    client = PipelineClient(args.redis_url, args.prefix, args.max_pending)
    await client.start()
    stats = asyncio.create_task(publish_gateway_stats(client.redis, client.names, client.gateway_id,
                                                      settings.metrics))
    grpc = None
    try:
        if args.grpc_port:
            # A gateway given its API socket (--fd) runs under `pagestream serve`, which holds the gRPC port for
            # all its gateways: each shares it through SO_REUSEPORT (launcher.reserve_grpc_port). On its own, a
            # gateway binds it alone, so a port in use is an error rather than a port silently shared.
            grpc = await _start_grpc(client, settings, args.host, args.grpc_port, shared=args.fd is not None)
        # No access log: at hundreds of requests a second it costs more than it tells; /metrics counts them.
        config = uvicorn.Config(build_app(client, settings), host=args.host, port=args.port, log_config=None,
                                access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        # Under `serve --gateways N` every gateway accepts on one listening socket that serve bound: the kernel
        # hands each connection to one of them.
        sockets = [socket.socket(fileno=args.fd)] if args.fd is not None else None
        await _Server(config).serve(sockets=sockets)
    finally:
        stats.cancel()
        await asyncio.gather(stats, return_exceptions=True)
        if grpc is not None:
            await grpc.stop()
        await client.close()


def run(args: argparse.Namespace) -> int:
    from services.runtime import setup_logging
    setup_logging("gateway")
    asyncio.run(serve(args, settings_from_args(args)))
    return 0
