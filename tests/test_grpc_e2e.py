"""The gRPC API against the whole running stack (`pagestream serve`: gateway, tokenizer, scheduler, worker,
detokenizer, Redis): prompts and chats stream to a finish, health is SERVING, a bad request is refused with
INVALID_ARGUMENT, and a cancelled stream aborts its request while the server keeps serving."""
from __future__ import annotations

import json
import time

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("services.launcher", reason="the serving stack (services/launcher.py) is not there yet")

from schemas import pagestream_pb2 as pb                      # noqa: E402
from schemas import pagestream_pb2_grpc as pb_grpc            # noqa: E402

TIMEOUT_S = 120                           # per call: the model runs on CPU here
GREEDY = dict(temperature=0, ignore_eos=True)


class ApiKey(grpc.UnaryStreamClientInterceptor):
    """Sends the stack's API key with every streaming call, as a client of a keyed server does."""

    def __init__(self, key: str):
        self.metadata = [("authorization", f"Bearer {key}")]

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(details._replace(metadata=list(details.metadata or []) + self.metadata), request)


@pytest.fixture(scope="module")
def channel(serve_stack):
    with grpc.insecure_channel(f"localhost:{serve_stack.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="module")
def stub(channel, serve_stack):
    return pb_grpc.GenerationStub(grpc.intercept_channel(channel, ApiKey(serve_stack.api_key)))


def test_a_wrong_key_is_unauthenticated(channel):
    request = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.RpcError) as failure:
        list(pb_grpc.GenerationStub(grpc.intercept_channel(channel, ApiKey("wrong"))).Generate(request, timeout=30))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


def complete(stub, request: pb.GenerateRequest) -> tuple[str, list[int], pb.GenerateResponse]:
    """The text and tokens of completion 0, and its last response."""
    text, token_ids, last = "", [], None
    for response in stub.Generate(request, timeout=TIMEOUT_S):
        assert response.index == 0 and last is None           # nothing after the last response
        text += response.text
        token_ids += response.token_ids
        if response.finish_reason:
            last = response
    assert last is not None, "the stream ended without a finish_reason"
    return text, token_ids, last


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 10                            # the status follows liveness once a second
    for service in ("", "pagestream.v1.Generation"):
        while True:
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_prompt_streams_to_length(stub):
    request = pb.GenerateRequest(prompt="The capital of France is",
                                 sampling_params=pb.SamplingParams(max_tokens=8, **GREEDY))
    text, token_ids, last = complete(stub, request)
    assert len(token_ids) == 8 and text
    assert last.finish_reason == "length" and last.request_id.startswith("grpc-")
    assert last.usage.completion_tokens == 8 and last.usage.prompt_tokens > 0


def test_chat_streams_to_a_finish(stub):
    chat = pb.Chat(messages=[pb.Message(role="user", content="Say hello.")])
    text, token_ids, last = complete(stub, pb.GenerateRequest(
        chat=chat, sampling_params=pb.SamplingParams(max_tokens=12, temperature=0)))
    assert token_ids and text
    assert last.finish_reason in ("stop", "length") and last.usage.completion_tokens == len(token_ids)


def test_bad_request_is_invalid_argument(stub):
    request = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(temperature=-1))
    with pytest.raises(grpc.RpcError) as failure:
        list(stub.Generate(request, timeout=TIMEOUT_S))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in failure.value.details()


def test_cancelled_stream_aborts_and_the_server_keeps_serving(stub, serve_stack):
    def blocks_used() -> float:
        return serve_stack.metric("pagestream_kv_blocks_used")

    deadline = time.monotonic() + 5                        # the scheduler's stats refresh every half second
    while blocks_used() > 0:
        assert time.monotonic() < deadline, "blocks held before the test began"
        time.sleep(0.1)
    call = stub.Generate(pb.GenerateRequest(prompt="Once upon a time",
                                            sampling_params=pb.SamplingParams(max_tokens=1500, **GREEDY)),
                         timeout=TIMEOUT_S)
    next(call)
    deadline = time.monotonic() + 5
    while blocks_used() == 0:                              # the stats show the request's blocks
        assert time.monotonic() < deadline, "the request's blocks never showed"
        time.sleep(0.1)
    call.cancel()

    # The gateway left the stream, so the pipeline aborted the request (its 1,500 tokens would take minutes
    # on a CPU): its KV blocks are free again. (The abort stream itself is trimmed as soon as the scheduler has
    # read it, so it is not where to look.)
    deadline = time.monotonic() + 10
    while blocks_used() > 0:
        assert time.monotonic() < deadline, "the cancelled request still holds KV blocks"
        time.sleep(0.1)

    _, token_ids, last = complete(stub, pb.GenerateRequest(
        prompt="Hello", sampling_params=pb.SamplingParams(max_tokens=4, **GREEDY)))
    assert len(token_ids) == 4 and last.finish_reason == "length"


# ---- chat tools and output constraints, read and answered as the HTTP API does ---------------------------------
ADD = {"name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                      "required": ["a", "b"], "additionalProperties": False}}
ASK_SUM = pb.Message(role="user", content="What is 17 plus 25?")


def by_completion(responses) -> dict[int, dict]:
    """Each completion's text, calls (name, arguments) and finish reason, from its responses."""
    completions: dict[int, dict] = {}
    for r in responses:
        c = completions.setdefault(r.index, {"text": "", "calls": [], "finish": ""})
        c["text"] += r.text
        c["calls"] += [(call.name, call.arguments) for call in r.tool_calls]
        assert all(call.id.startswith("call_") for call in r.tool_calls)
        c["finish"] = r.finish_reason or c["finish"]
    return completions


def test_a_named_tool_is_called_streamed_and_whole(stub):
    """tool_choice naming a function: each completion calls it once, with arguments valid for its schema; a seeded
    request samples the same calls whether it streams or comes whole."""
    msg = pb.GenerateRequest(
        chat=pb.Chat(messages=[ASK_SUM], tools=[pb.Tool(name="add", description=ADD["description"],
                                                        parameters=json.dumps(ADD["parameters"]))],
                     tool_choice=pb.ToolChoice(function="add")),
        sampling_params=pb.SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=60))
    streamed = by_completion(stub.Generate(msg, timeout=TIMEOUT_S))
    msg.whole = True
    whole_responses = list(stub.Generate(msg, timeout=TIMEOUT_S))
    assert [r.index for r in whole_responses] == [0, 1]
    whole = by_completion(whole_responses)
    assert streamed == whole
    for completion in whole.values():
        assert completion["finish"] == "tool_calls" and not completion["text"].strip()
        [(name, arguments)] = completion["calls"]
        assert name == "add"
        jsonschema.validate(json.loads(arguments), ADD["parameters"])


def test_output_constraints_hold(stub):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    chat = pb.Chat(messages=[pb.Message(role="user", content="Is the sky blue? Answer in JSON.")])
    by_schema = pb.GenerateRequest(chat=chat, whole=True, response_format=pb.ResponseFormat(
        type="json_schema", json_schema=pb.JsonSchema(name="answer", schema=json.dumps(schema))),
        sampling_params=pb.SamplingParams(temperature=1.0, seed=1, max_tokens=60))
    (response,) = stub.Generate(by_schema, timeout=TIMEOUT_S)
    assert response.finish_reason == "stop", response.text
    jsonschema.validate(json.loads(response.text), schema)

    by_choice = pb.GenerateRequest(chat=chat, sampling_params=pb.SamplingParams(
        temperature=1.0, seed=2, max_tokens=10, structured_outputs=pb.StructuredOutputs(
            choice=pb.Choices(choices=["sure", "nope"]))))
    text, _, last = complete(stub, by_choice)
    assert text in ("sure", "nope") and last.finish_reason == "stop"


def test_bad_tools_are_invalid_arguments(stub):
    bad = pb.GenerateRequest(chat=pb.Chat(messages=[ASK_SUM], tools=[pb.Tool(name="add", parameters="{")]))
    with pytest.raises(grpc.RpcError) as failure:
        list(stub.Generate(bad, timeout=TIMEOUT_S))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools[0].parameters" in failure.value.details()
    # A grammar xgrammar cannot compile is the tokenizer's to refuse: the same status, through the pipeline.
    uncompilable = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(
        max_tokens=4, structured_outputs=pb.StructuredOutputs(grammar="root ::= nothing_defined")))
    with pytest.raises(grpc.RpcError) as failure:
        list(stub.Generate(uncompilable, timeout=TIMEOUT_S))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
