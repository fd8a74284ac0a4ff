"""The gRPC API against the whole running stack (`pagestream serve`: gateway, tokenizer, scheduler, worker,
detokenizer, Redis): prompts and chats stream to a finish, health is SERVING, a bad request is refused with
INVALID_ARGUMENT, and a cancelled stream aborts its request while the server keeps serving."""
from __future__ import annotations

import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("services.launcher", reason="the serving stack (services/launcher.py) is not there yet")

from schemas import pagestream_pb2 as pb                      # noqa: E402
from schemas import pagestream_pb2_grpc as pb_grpc            # noqa: E402
from schemas.codec import decode                              # noqa: E402
from schemas.messages import Abort                            # noqa: E402
from services.transport import FIELD, Names                   # noqa: E402

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
    call = stub.Generate(pb.GenerateRequest(prompt="Once upon a time",
                                            sampling_params=pb.SamplingParams(max_tokens=500, **GREEDY)),
                         timeout=TIMEOUT_S)
    first = next(call)
    request_id = first.request_id              # the server's own id (the client sent none)
    call.cancel()

    # The gateway left the stream, so the pipeline got an abort for the request.
    aborts = redis.Redis.from_url(serve_stack.redis_url)
    deadline = time.monotonic() + 10
    while Abort(request_id) not in [decode(Abort, fields[FIELD])
                                    for _, fields in aborts.xrange(Names(serve_stack.prefix).abort)]:
        assert time.monotonic() < deadline, "no abort reached the pipeline"
        time.sleep(0.1)
    aborts.close()

    _, token_ids, last = complete(stub, pb.GenerateRequest(
        prompt="Hello", sampling_params=pb.SamplingParams(max_tokens=4, **GREEDY)))
    assert len(token_ids) == 4 and last.finish_reason == "length"
