"""The gRPC API (schemas/pagestream.proto), served in the gateway's event loop through its PipelineClient.

    server = await start(client, settings, port, host)    # Generation + grpc.health.v1.Health on host:port
    ...
    await server.stop()

Generate converts the proto request to a GenerateRequest, streams each ReplyItem back as a GenerateResponse as it
arrives, and ends the call on an error with the gRPC status matching its HTTP code. The health service follows the
pipeline's liveness (the scheduler's and the worker's heartbeats), so a load balancer stops sending calls that would
fail.

The server names every request itself (PipelineClient.new_request_id): the id keys the request's state in Redis,
which every gateway on that Redis shares, so a client's own request_id is only echoed in its responses, for
tracing. (Were it used, a client that reused another's id would be sent the other's text.)
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import defaultdict
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from schemas import pagestream_pb2 as pb
from schemas import pagestream_pb2_grpc as pb_grpc
from schemas.codec import decode, encode
from schemas.messages import ChatMessage, GenerateRequest, ReplyItem
from schemas.sampling_params import SamplingParams
from services.pipeline_client import Overloaded, PipelineClient, Unavailable

log = logging.getLogger("pagestream.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name      # "pagestream.v1.Generation"
HEALTH_POLL_SECONDS = 1.0
MAX_CLIENT_REQUEST_ID = 256                 # characters of a client's request_id (the proto's documented limit)

_DEFAULTS = SamplingParams()
_STATUS_BY_HTTP_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class Settings(Protocol):
    """What this module reads of the gateway's settings."""
    api_keys: list[str]
    max_n: int
    served_model_name: str
    sampling_defaults: dict[str, float]


# ---- conversion ------------------------------------------------------------------------------------------------
def params_from_proto(p: pb.SamplingParams, defaults: dict[str, float] | None = None) -> SamplingParams:
    """Unset optional fields take the model's sampling defaults (the HTTP API's, engine.model_files), else
    SamplingParams' own. Raises ValueError for an out-of-range value."""
    def optional(name: str):
        if p.HasField(name):
            return getattr(p, name)
        return (defaults or {}).get(name, getattr(_DEFAULTS, name))

    return SamplingParams(
        n=p.n or _DEFAULTS.n, temperature=optional("temperature"), top_p=optional("top_p"), top_k=p.top_k,
        min_p=p.min_p, seed=optional("seed"), presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, repetition_penalty=optional("repetition_penalty"),
        max_tokens=optional("max_tokens"), min_tokens=p.min_tokens, stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, logprobs=optional("logprobs"),
        include_stop_str_in_output=p.include_stop_str_in_output, skip_special_tokens=optional("skip_special_tokens"))


def request_from_proto(msg: pb.GenerateRequest, request_id: str,
                       sampling_defaults: dict[str, float] | None = None) -> GenerateRequest:
    """The pipeline's request for a proto one, named request_id (the server's id; msg.request_id, the client's,
    is not used here). Raises ValueError for anything the pipeline would reject as malformed."""
    if len(msg.request_id) > MAX_CLIENT_REQUEST_ID:         # never in the pipeline, but echoed in every response
        raise ValueError(f"request_id is longer than {MAX_CLIENT_REQUEST_ID} characters")
    request = GenerateRequest(request_id=request_id, gateway="",
                              params=params_from_proto(msg.sampling_params, sampling_defaults), arrival=time.time())
    match msg.WhichOneof("input"):
        case "prompt":
            request.prompt = msg.prompt
        case "prompt_token_ids":
            request.prompt_token_ids = list(msg.prompt_token_ids.ids)
        case "chat":
            request.messages = [ChatMessage(role=m.role, content=m.content) for m in msg.chat.messages]
        case None:
            raise ValueError("one of prompt, prompt_token_ids or chat is required")
    # The tokenizer decodes with the schema's size limits, and a request it cannot decode is never answered:
    # check them here, where the client can still be told.
    decode(GenerateRequest, encode(request))
    return request


def response_from_reply(item: ReplyItem, usage: pb.Usage | None = None, request_id: str | None = None
                        ) -> pb.GenerateResponse:
    """request_id: the id the client sees (what it sent); default the pipeline's own, item.request_id."""
    response = pb.GenerateResponse(
        request_id=request_id or item.request_id, index=item.index, text=item.text, token_ids=item.token_ids,
        finish_reason=item.finish_reason or "", usage=usage,
        logprobs=[pb.TokenLogprob(logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)
                  for lp in item.logprobs or ()])
    if isinstance(item.stop_reason, str):
        response.stop_str = item.stop_reason
    elif item.stop_reason is not None:
        response.stop_token_id = item.stop_reason
    return response


def status_for(http_code: int) -> grpc.StatusCode:
    return _STATUS_BY_HTTP_CODE.get(http_code, grpc.StatusCode.INTERNAL)


class _UsageCounter:
    """A request's token counts, for the usage on each completion's last response."""

    def __init__(self) -> None:
        self.completion_tokens: dict[int, int] = defaultdict(int)
        self.prompt_tokens = self.cached_tokens = 0

    def add(self, item: ReplyItem) -> pb.Usage | None:
        self.completion_tokens[item.index] += len(item.token_ids)
        # The prompt counts are the request's; keep them from whichever item carried them.
        self.prompt_tokens = max(self.prompt_tokens, item.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, item.cached_tokens)
        if item.finish_reason is None:
            return None
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens[item.index],
                        cached_tokens=self.cached_tokens)


# ---- the service -----------------------------------------------------------------------------------------------
class _Generation(pb_grpc.GenerationServicer):
    def __init__(self, client: PipelineClient, settings: Settings):
        self._client = client
        self._settings = settings

    async def Generate(self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # Responses go out through context.write from this coroutine rather than by yielding them: when the
        # client cancels, grpc cancels this task, the CancelledError surfaces here wherever it waits, and
        # aclosing() closes the pipeline's stream at once, which aborts the request. (A yielding handler cancelled
        # while grpc sends its response sits suspended at the yield, and only the garbage collector closes it.)
        await self._authenticate(context)
        settings = self._settings
        if msg.model and msg.model != settings.served_model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {msg.model!r} is not served here (this server serves "
                                f"{settings.served_model_name!r})")
        try:
            request = request_from_proto(msg, self._client.new_request_id("grpc"), settings.sampling_defaults)
            echoed_id = msg.request_id or request.request_id        # the client's id, or ours when it sent none
            if request.params.n > settings.max_n:
                raise ValueError(f"n must be at most {settings.max_n}, got {request.params.n}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        failure: tuple[grpc.StatusCode, str] | None = None
        usage = _UsageCounter()
        try:
            async with aclosing(self._client.generate(request)) as items:
                async for item in items:
                    if item.error is not None:
                        failure = status_for(item.error.code), item.error.message
                        break
                    await context.write(response_from_reply(item, usage.add(item), echoed_id))
        except Overloaded as e:
            failure = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except Unavailable as e:
            failure = grpc.StatusCode.UNAVAILABLE, str(e)
        except Exception:
            log.exception("request %s (client's id %r) failed", request.request_id, msg.request_id)
            failure = grpc.StatusCode.INTERNAL, "internal error"
        if failure is not None:
            await context.abort(*failure)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        keys = self._settings.api_keys
        if not keys:
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, key = str(metadata.get("authorization", "")).partition(" ")
        # compare_digest: the time taken must not tell how much of a key was right.
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer <key>'")


# ---- the server ------------------------------------------------------------------------------------------------
async def _set_health(servicer: health.aio.HealthServicer, alive: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in (health.OVERALL_HEALTH, SERVICE_NAME):
        await servicer.set(service, status)


async def _follow_liveness(servicer: health.aio.HealthServicer, client: PipelineClient, alive: bool) -> None:
    while True:
        await asyncio.sleep(HEALTH_POLL_SECONDS)
        if client.pipeline_alive != alive:      # set() wakes every Watch stream, so only on a change
            alive = client.pipeline_alive
            await _set_health(servicer, alive)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int                                    # the bound port (the one asked for, or the OS's pick for 0)
    health_servicer: health.aio.HealthServicer
    liveness: asyncio.Task

    async def stop(self, grace: float = 2) -> None:
        """Report NOT_SERVING, refuse new calls, and give the calls in flight `grace` seconds to finish."""
        self.liveness.cancel()
        await asyncio.gather(self.liveness, return_exceptions=True)
        await self.health_servicer.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start(client: PipelineClient, settings: Settings, port: int, host: str = "127.0.0.1",
                shared: bool = False) -> GrpcServer:
    """Serve on host:port (port 0: one the OS picks); raises RuntimeError when it cannot be bound. shared: bind
    with SO_REUSEPORT, beside the other gateways of one `pagestream serve` (which holds the port for them:
    launcher.reserve_grpc_port). Otherwise not: grpc sets SO_REUSEPORT by default, and a second server on a
    taken port would start and share it silently."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared))])
    pb_grpc.add_GenerationServicer_to_server(_Generation(client, settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    alive = client.pipeline_alive
    await _set_health(health_servicer, alive)      # before the first call can ask
    liveness = asyncio.create_task(_follow_liveness(health_servicer, client, alive), name="grpc-health")
    await server.start()
    return GrpcServer(server, bound, health_servicer, liveness)
