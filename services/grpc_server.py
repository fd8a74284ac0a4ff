"""The gRPC API (schemas/pagestream.proto), served in the gateway's event loop through its PipelineClient.

    server = await start(client, settings, port, host)    # Generation + grpc.health.v1.Health on host:port
    ...
    await server.stop()

Generate converts the proto request to a GenerateRequest, streams each ReplyItem back as a GenerateResponse as it
arrives, and ends the call on an error with the gRPC status matching its HTTP code. A chat's tools, tool_choice,
messages and output constraints go through the HTTP API's own parser (services/openai_protocol.py), and its
output through the HTTP API's ResponseBuilder where it must be split (tool calls, reasoning) or answered whole:
one reading of each field and one tool-call parser for both APIs. The health service follows the
pipeline's liveness (the scheduler's and the worker's heartbeats), so a load balancer stops sending calls that would
fail.

The server names every request itself (PipelineClient.new_request_id): the id keys the request's state in Redis,
which every gateway on that Redis shares, so a client's own request_id is only echoed in its responses, for
tracing. (Were it used, a client that reused another's id would be sent the other's text.)
"""
from __future__ import annotations

import asyncio
import hmac
import json
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
from schemas.messages import GenerateRequest, ReplyItem
from schemas.sampling_params import SamplingParams
from services.openai_protocol import (Limits, ParsedRequest, ProtocolError, ResponseBuilder, TokenText,
                                      parse_messages, parse_structured_outputs, parse_tools)
from services.pipeline_client import Overloaded, PipelineClient, Unavailable
from services.reasoning import REASONING_PARSERS

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
    limits: Limits                          # the HTTP API's: sampling defaults, tool-call and reasoning parsers


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


def parse_proto(msg: pb.GenerateRequest, limits: Limits) -> ParsedRequest:
    """The request as the HTTP API's parser reads the same one; unset sampling fields take limits' sampling
    defaults. Raises ValueError for anything the pipeline would reject as malformed."""
    if len(msg.request_id) > MAX_CLIENT_REQUEST_ID:         # never in the pipeline, but echoed in every response
        raise ValueError(f"request_id is longer than {MAX_CLIENT_REQUEST_ID} characters")
    params = params_from_proto(msg.sampling_params, limits.sampling_defaults)
    try:
        params.structured_outputs = parse_structured_outputs(_output_constraint(msg))
        match msg.WhichOneof("input"):
            case "prompt":
                parsed = ParsedRequest(chat=False, model=limits.served_model_name, params=params,
                                       prompts=[msg.prompt])
            case "prompt_token_ids":
                parsed = ParsedRequest(chat=False, model=limits.served_model_name, params=params,
                                       prompts=[list(msg.prompt_token_ids.ids)])
            case "chat":
                parsed = ParsedRequest(chat=True, model=limits.served_model_name, params=params,
                                       messages=parse_messages([_message(m) for m in msg.chat.messages]),
                                       reasoning_format=REASONING_PARSERS.get(limits.reasoning_parser),
                                       **parse_tools(_tool_fields(msg.chat), params, limits))
            case None:
                raise ValueError("one of prompt, prompt_token_ids or chat is required")
    except ProtocolError as e:
        raise ValueError(str(e)) from None
    parsed.stream = not msg.whole
    return parsed


def request_from_proto(msg: pb.GenerateRequest, request_id: str, limits: Limits | None = None) -> GenerateRequest:
    """The pipeline's request for a proto one, named request_id (the server's id; msg.request_id, the client's,
    is not used here). Raises ValueError for anything the pipeline would reject as malformed."""
    return pipeline_request(parse_proto(msg, limits or Limits(served_model_name="")), request_id)


def pipeline_request(parsed: ParsedRequest, request_id: str) -> GenerateRequest:
    (request,) = parsed.generate_requests(request_id, time.time())
    # The tokenizer decodes with the schema's size limits, and a request it cannot decode is never answered:
    # check them here, where the client can still be told.
    decode(GenerateRequest, encode(request))
    return request


def _json(text: str, name: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None


def _message(m: pb.Message) -> dict:
    """A chat message as the HTTP API's JSON has it."""
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in m.tool_calls]
    return {"role": m.role, "content": m.content, "tool_calls": calls or None, "tool_call_id": m.tool_call_id or None}


def _tool_fields(chat: pb.Chat) -> dict:
    """A chat's tools, tool_choice and parallel_tool_calls as the HTTP API's JSON body has them."""
    tools = []
    for i, tool in enumerate(chat.tools):
        function = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters:
            function["parameters"] = _json(tool.parameters, f"tools[{i}].parameters")
        if tool.HasField("strict"):
            function["strict"] = tool.strict
        tools.append({"type": "function", "function": function})
    body: dict = {"tools": tools or None}
    match chat.tool_choice.WhichOneof("choice"):
        case "mode":
            body["tool_choice"] = chat.tool_choice.mode
        case "function":
            body["tool_choice"] = {"type": "function", "function": {"name": chat.tool_choice.function}}
    if chat.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = chat.parallel_tool_calls
    return body


def _output_constraint(msg: pb.GenerateRequest) -> dict:
    """response_format and structured_outputs as the HTTP API's JSON body has them."""
    body = {}
    if msg.HasField("response_format"):
        response_format: dict = {"type": msg.response_format.type}
        if msg.response_format.HasField("json_schema"):
            schema = msg.response_format.json_schema
            response_format["json_schema"] = {"schema": _json(schema.schema, "response_format.json_schema.schema")}
            response_format["json_schema"].update({k: getattr(schema, k) for k in ("name", "description")
                                                   if getattr(schema, k)})
            if schema.HasField("strict"):
                response_format["json_schema"]["strict"] = schema.strict
        body["response_format"] = response_format
    if msg.sampling_params.HasField("structured_outputs"):
        spec = msg.sampling_params.structured_outputs
        kind = spec.WhichOneof("constraint")
        body["structured_outputs"] = {"disable_any_whitespace": spec.disable_any_whitespace}
        if kind is not None:
            body["structured_outputs"][kind] = list(spec.choice.choices) if kind == "choice" else getattr(spec, kind)
    return body


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


class _Responses:
    """One request's ReplyItems as its GenerateResponses: each as it comes, or (whole) each completion's once all
    finished. A chat's text is split into its answer, its thinking and its tool calls by the HTTP API's
    ResponseBuilder, as it streams or whole; text that needs no splitting streams as it came."""

    def __init__(self, parsed: ParsedRequest, request_id: str, echoed_id: str):
        self.echoed_id, self.whole = echoed_id, not parsed.stream
        self.usage = _UsageCounter()
        splits = parsed.tool_format is not None or parsed.reasoning_format is not None
        # Token text is for the HTTP API's logprobs, which gRPC sends as token ids: none is needed.
        self.builder = ResponseBuilder(parsed, request_id, 0, TokenText()) if splits or self.whole else None
        self.completions: dict[int, ReplyItem] = defaultdict(lambda: ReplyItem(request_id, logprobs=[]))
        self.usages: dict[int, pb.Usage] = {}

    def add(self, item: ReplyItem) -> pb.GenerateResponse | None:
        usage = self.usage.add(item)
        if self.whole:
            self.builder.add(0, item)
            kept = self.completions[item.index]
            kept.token_ids += item.token_ids
            kept.logprobs += item.logprobs or ()
            if usage is not None:
                self.usages[item.index] = usage
            return None
        response = response_from_reply(item, usage, self.echoed_id)
        if self.builder is not None:
            _split(response, [c["choices"][0] for c in self.builder.add_chunks(0, item)])
        return response

    def finish(self) -> list[pb.GenerateResponse]:
        """Whole: each completion's response, in order of index."""
        if not self.whole:
            return []
        responses = []
        for choice in self.builder.response()["choices"]:
            item = self.completions[choice["index"]]
            item.index, item.stop_reason = choice["index"], choice["stop_reason"]
            response = response_from_reply(item, self.usages.get(item.index), self.echoed_id)
            message = choice.get("message") or {"content": choice["text"]}
            response.text = message["content"] or ""
            response.reasoning_content = message.get("reasoning_content") or ""
            response.tool_calls.extend(pb.ToolCall(id=call["id"], name=call["function"]["name"],
                                                   arguments=call["function"]["arguments"])
                                       for call in message.get("tool_calls") or ())
            response.finish_reason = choice["finish_reason"] or ""
            responses.append(response)
        return responses


def _split(response: pb.GenerateResponse, chunks: list[dict]) -> None:
    """Sets response's text, reasoning_content, tool_calls and finish_reason from the HTTP API's stream chunks
    for the same item (their choices: a call's first delta has its id and name, the next its arguments)."""
    deltas = [chunk["delta"] for chunk in chunks]
    response.text = "".join(delta.get("content") or "" for delta in deltas)
    response.reasoning_content = "".join(delta.get("reasoning_content") or "" for delta in deltas)
    for delta in deltas:
        for call in delta.get("tool_calls") or ():
            if "id" in call:
                response.tool_calls.append(pb.ToolCall(id=call["id"], name=call["function"]["name"]))
            response.tool_calls[-1].arguments += call["function"]["arguments"]
    if chunks and chunks[-1]["finish_reason"] is not None:      # "tool_calls" where it called any
        response.finish_reason = chunks[-1]["finish_reason"]


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
            parsed = parse_proto(msg, settings.limits)
            request = pipeline_request(parsed, self._client.new_request_id("grpc"))
            echoed_id = msg.request_id or request.request_id        # the client's id, or ours when it sent none
            if request.params.n > settings.max_n:
                raise ValueError(f"n must be at most {settings.max_n}, got {request.params.n}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        failure: tuple[grpc.StatusCode, str] | None = None
        responses = _Responses(parsed, request.request_id, echoed_id)
        try:
            async with aclosing(self._client.generate(request)) as batches:
                async for items in batches:
                    for item in items:
                        if item.error is not None:
                            failure = status_for(item.error.code), item.error.message
                            break
                        response = responses.add(item)
                        if response is not None:
                            await context.write(response)
                    if failure is not None:
                        break
            if failure is None:
                for response in responses.finish():
                    await context.write(response)
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
