"""The gRPC API without the pipeline: the generated code matches schemas/pagestream.proto, requests and replies
convert both ways, and the server (in-process, over a real socket, with a fake PipelineClient) streams, maps
errors to status codes, authenticates, aborts a cancelled request and reports health.

Regenerate the committed code after editing the .proto:  python tests/test_grpc_proto.py
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from schemas import pagestream_pb2 as pb
from schemas import pagestream_pb2_grpc as pb_grpc
from schemas.messages import ChatMessage, ErrorInfo, ReplyItem, TokenLogprobsWire
from schemas.sampling_params import SamplingParams
from services import grpc_server
from services.grpc_server import params_from_proto, request_from_proto, response_from_reply
from services.pipeline_client import Overloaded, Unavailable

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
GENERATED = ("pagestream_pb2.py", "pagestream_pb2_grpc.py", "pagestream_pb2.pyi")
S = grpc.StatusCode


def generate(out_dir: Path) -> None:
    """protoc's Python output for schemas/pagestream.proto, with the service module importing its messages from
    the schemas package (protoc writes a top-level `import pagestream_pb2`, which only works from schemas/)."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{SCHEMAS}", f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", str(SCHEMAS / "pagestream.proto")],
                   check=True)
    service = out_dir / "pagestream_pb2_grpc.py"
    text = service.read_text()
    fixed = text.replace("\nimport pagestream_pb2 as", "\nfrom schemas import pagestream_pb2 as")
    assert fixed != text, "protoc's import line changed; update generate()"
    service.write_text(fixed)


def test_generated_code_matches_the_proto(tmp_path):
    generate(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (SCHEMAS / name).read_text(), \
            f"schemas/{name} is stale: run `python tests/test_grpc_proto.py`"


# ---- conversion ------------------------------------------------------------------------------------------------
def test_unset_params_are_the_defaults():
    assert params_from_proto(pb.SamplingParams()) == SamplingParams()
    # The model's sampling defaults fill the optional fields a client leaves out, as on the HTTP API.
    assert params_from_proto(pb.SamplingParams(), {"temperature": 0.2, "top_p": 0.9}) == \
        SamplingParams(temperature=0.2, top_p=0.9)
    assert params_from_proto(pb.SamplingParams(temperature=0), {"temperature": 0.2}).temperature == 0


def test_zero_differs_from_unset_where_it_means_something():
    params = params_from_proto(pb.SamplingParams(temperature=0, seed=0, logprobs=0, skip_special_tokens=False))
    assert (params.temperature, params.seed, params.logprobs, params.skip_special_tokens) == (0.0, 0, 0, False)
    assert params.greedy


def test_every_param_converts():
    p = pb.SamplingParams(n=3, temperature=0.5, top_p=0.75, top_k=40, min_p=0.25, seed=7, presence_penalty=0.5,
                          frequency_penalty=-0.5, repetition_penalty=1.25, max_tokens=100, min_tokens=5,
                          stop=["\n\n", "END"], stop_token_ids=[9, 10], ignore_eos=True, logprobs=5,
                          include_stop_str_in_output=True, skip_special_tokens=False)
    # Values exactly representable in float32, so they compare equal after the proto's single precision.
    assert params_from_proto(p) == SamplingParams(
        n=3, temperature=0.5, top_p=0.75, top_k=40, min_p=0.25, seed=7, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.25, max_tokens=100, min_tokens=5, stop=["\n\n", "END"],
        stop_token_ids=[9, 10], ignore_eos=True, logprobs=5, include_stop_str_in_output=True,
        skip_special_tokens=False)


@pytest.mark.parametrize("params", [pb.SamplingParams(temperature=-1), pb.SamplingParams(max_tokens=0),
                                    pb.SamplingParams(top_p=0), pb.SamplingParams(logprobs=21),
                                    pb.SamplingParams(top_k=-2), pb.SamplingParams(stop=[""])])
def test_out_of_range_params_raise(params):
    with pytest.raises(ValueError):
        params_from_proto(params)


def test_requests_convert_for_each_input():
    by_prompt = request_from_proto(pb.GenerateRequest(prompt="Hello"), "grpc-1")
    assert (by_prompt.request_id, by_prompt.prompt, by_prompt.prompt_token_ids, by_prompt.messages) == \
        ("grpc-1", "Hello", None, None)
    assert by_prompt.gateway == "" and by_prompt.arrival > 0 and by_prompt.params == SamplingParams()

    by_ids = request_from_proto(pb.GenerateRequest(request_id="mine", prompt_token_ids=pb.TokenIds(ids=[5, 6])), "x")
    assert (by_ids.request_id, by_ids.prompt_token_ids) == ("x", [5, 6])      # the server's id, never the client's

    chat = pb.Chat(messages=[pb.Message(role="system", content="Be brief."), pb.Message(role="user", content="Hi")])
    by_chat = request_from_proto(pb.GenerateRequest(chat=chat, sampling_params=pb.SamplingParams(max_tokens=8)), "x")
    assert by_chat.messages == [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    assert by_chat.params.max_tokens == 8


@pytest.mark.parametrize("msg", [
    pb.GenerateRequest(),                                                             # no input
    pb.GenerateRequest(request_id="r" * 257, prompt="Hi"),                            # the proto's limit
    pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="x" * 65, content="Hi")])),
])
def test_malformed_requests_raise(msg):
    with pytest.raises(ValueError):
        request_from_proto(msg, "grpc-1")


def test_replies_convert():
    running = response_from_reply(ReplyItem("r", index=1, seq=0, text="Hel", token_ids=[4, 5]))
    assert (running.request_id, running.index, running.text, list(running.token_ids)) == ("r", 1, "Hel", [4, 5])
    assert running.finish_reason == "" and not running.HasField("usage") and running.WhichOneof("stop_reason") is None

    lp = TokenLogprobsWire(logprob=-0.5, top_token_ids=[7, 8], top_logprobs=[-0.5, -1.5])
    by_token = response_from_reply(ReplyItem("r", text="lo", token_ids=[7], logprobs=[lp], finish_reason="stop",
                                             stop_reason=7), pb.Usage(prompt_tokens=3, completion_tokens=3))
    assert (by_token.finish_reason, by_token.stop_token_id, by_token.usage.completion_tokens) == ("stop", 7, 3)
    assert [(t.logprob, list(t.top_token_ids), list(t.top_logprobs)) for t in by_token.logprobs] == \
        [(-0.5, [7, 8], [-0.5, -1.5])]

    by_string = response_from_reply(ReplyItem("r", finish_reason="stop", stop_reason="END"))
    assert by_string.stop_str == "END"


@pytest.mark.parametrize("code, status", [(400, S.INVALID_ARGUMENT), (401, S.UNAUTHENTICATED), (404, S.NOT_FOUND),
                                          (429, S.RESOURCE_EXHAUSTED), (503, S.UNAVAILABLE), (500, S.INTERNAL),
                                          (413, S.INTERNAL)])
def test_http_codes_map_to_status_codes(code, status):
    assert grpc_server.status_for(code) == status


# ---- the server, with a fake pipeline --------------------------------------------------------------------------
@dataclass
class Settings:
    api_keys: list[str] = field(default_factory=list)
    max_n: int = 4
    served_model_name: str = "tiny"
    sampling_defaults: dict = field(default_factory=dict)


class FakeClient:
    """PipelineClient's surface: replays `items`, then waits forever if `hang` (a request still generating)."""

    def __init__(self, items: list[ReplyItem] = (), raises: Exception | None = None, hang: bool = False):
        self.items, self.raises, self.hang = list(items), raises, hang
        self.pipeline_alive = True
        self.requests = []
        self.closed = asyncio.Event()      # set when the server leaves the iteration (PipelineClient aborts then)

    def new_request_id(self, kind: str = "cmpl") -> str:
        return f"{kind}-{len(self.requests)}"

    async def generate(self, request):
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises
        try:
            for item in self.items:
                yield item
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed.set()


def run_with_server(client: FakeClient, test, settings: Settings | None = None):
    """Start the server on a free port, run `await test(stub, channel)`, stop the server; returns test's result."""
    async def main():
        server = await grpc_server.start(client, settings or Settings(), 0)
        try:
            async with grpc.aio.insecure_channel(f"localhost:{server.port}") as channel:
                return await test(pb_grpc.GenerationStub(channel), channel)
        finally:
            await server.stop(grace=0)

    return asyncio.run(main())


async def collect(stub, request: pb.GenerateRequest, metadata=None) -> list[pb.GenerateResponse]:
    return [r async for r in stub.Generate(request, metadata=metadata)]


async def status_of(stub, request: pb.GenerateRequest, metadata=None) -> tuple[S, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await collect(stub, request, metadata)
    return failure.value.code(), failure.value.details()


HELLO = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(n=2))


def test_streams_replies_with_usage_on_each_completions_last():
    items = [ReplyItem("grpc-0", 0, 0, "He", [1], prompt_tokens=2), ReplyItem("grpc-0", 1, 0, "Yo", [3]),
             ReplyItem("grpc-0", 0, 1, "y", [2, 4], finish_reason="length", prompt_tokens=2, cached_tokens=1),
             ReplyItem("grpc-0", 1, 1, "!", [5], finish_reason="stop", prompt_tokens=2, cached_tokens=1)]
    client = FakeClient(items)
    responses = run_with_server(client, lambda stub, _: collect(stub, HELLO))
    assert [(r.index, r.text, list(r.token_ids), r.finish_reason) for r in responses] == \
        [(0, "He", [1], ""), (1, "Yo", [3], ""), (0, "y", [2, 4], "length"), (1, "!", [5], "stop")]
    assert [r.HasField("usage") for r in responses] == [False, False, True, True]
    assert [(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_tokens) for r in responses[2:]] == \
        [(2, 3, 1), (2, 2, 1)]
    assert client.requests[0].request_id == "grpc-0" and client.requests[0].params.n == 2


@pytest.mark.parametrize("code, status", [(400, S.INVALID_ARGUMENT), (503, S.UNAVAILABLE), (500, S.INTERNAL)])
def test_an_error_item_ends_the_call_with_its_status(code, status):
    client = FakeClient([ReplyItem("grpc-0", text="a", token_ids=[1]),
                         ReplyItem("grpc-0", error=ErrorInfo("it broke", code=code))])

    async def test(stub, _):
        call = stub.Generate(HELLO)
        first = await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        return first.text, failure.value.code(), failure.value.details()

    assert run_with_server(client, test) == ("a", status, "it broke")


@pytest.mark.parametrize("raises, status", [(Overloaded("busy"), S.RESOURCE_EXHAUSTED),
                                            (Unavailable("down"), S.UNAVAILABLE), (RuntimeError("bug"), S.INTERNAL)])
def test_client_exceptions_map_to_status_codes(raises, status):
    code, _ = run_with_server(FakeClient(raises=raises), lambda stub, _: status_of(stub, HELLO))
    assert code == status


def test_invalid_requests_are_refused_before_the_pipeline():
    client = FakeClient()

    async def test(stub, _):
        return [await status_of(stub, request) for request in (
            pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(temperature=-1)),
            pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(n=5)),          # above max_n
            pb.GenerateRequest(),
            pb.GenerateRequest(prompt="Hi", model="other"))]

    statuses = run_with_server(client, test)
    assert [code for code, _ in statuses] == [S.INVALID_ARGUMENT] * 3 + [S.NOT_FOUND]
    assert "temperature" in statuses[0][1] and "n must be at most 4" in statuses[1][1]
    assert client.requests == []


def test_api_keys_are_required_when_configured():
    done = [ReplyItem("grpc-0", finish_reason="stop")]

    async def test(stub, _):
        missing = await status_of(stub, HELLO)
        wrong = await status_of(stub, HELLO, metadata=[("authorization", "Bearer nope")])
        right = await collect(stub, pb.GenerateRequest(prompt="Hi"), metadata=[("authorization", "Bearer k2")])
        return missing[0], wrong[0], [r.finish_reason for r in right]

    assert run_with_server(FakeClient(done), test, Settings(api_keys=["k1", "k2"])) == \
        (S.UNAUTHENTICATED, S.UNAUTHENTICATED, ["stop"])


def test_cancelling_the_call_closes_the_pipeline_stream():
    client = FakeClient([ReplyItem("grpc-0", text="a", token_ids=[1])], hang=True)

    async def test(stub, _):
        call = stub.Generate(pb.GenerateRequest(prompt="Hi"))
        await call.read()
        call.cancel()
        await asyncio.wait_for(client.closed.wait(), timeout=5)     # PipelineClient sends its abort here

    run_with_server(client, test)


def test_health_follows_the_pipeline(monkeypatch):
    monkeypatch.setattr(grpc_server, "HEALTH_POLL_SECONDS", 0.05)
    client = FakeClient()

    async def test(_, channel):
        health = health_pb2_grpc.HealthStub(channel)

        async def statuses():
            return [(await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                    for name in ("", "pagestream.v1.Generation")]

        before = await statuses()
        client.pipeline_alive = False
        await asyncio.sleep(0.3)
        return before, await statuses()

    before, after = run_with_server(client, test)
    assert before == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert after == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2


if __name__ == "__main__":
    generate(SCHEMAS)
