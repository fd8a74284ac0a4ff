"""The gRPC API without the pipeline: the generated code matches schemas/pagestream.proto, requests and replies
convert both ways, and the server (in-process, over a real socket, with a fake PipelineClient) streams, maps
errors to status codes, authenticates, aborts a cancelled request and reports health.

Regenerate the committed code after editing the .proto:  python tests/test_grpc_proto.py
"""
from __future__ import annotations

import asyncio
import json
import re
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
from services.openai_protocol import Limits, ResponseBuilder, TokenText, parse_chat, parse_completion
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


# ---- chat tools, structured outputs: read as the HTTP API reads the same request ------------------------------
WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
CALL_TEXT = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' \
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def proto_tool(function: dict) -> pb.Tool:
    return pb.Tool(name=function["name"], description=function.get("description", ""),
                   parameters=json.dumps(function["parameters"]))


def proto_chat(**chat) -> pb.GenerateRequest:
    messages = [pb.Message(role="user", content="Weather in Paris?"),
                pb.Message(role="assistant", tool_calls=[pb.ToolCall(id="call_1", name="get_weather",
                                                                     arguments='{"city": "Paris"}')]),
                pb.Message(role="tool", tool_call_id="call_1", content="18C")]
    return pb.GenerateRequest(chat=pb.Chat(messages=messages, tools=[proto_tool(WEATHER), proto_tool(TIME)], **chat),
                              sampling_params=pb.SamplingParams(max_tokens=40))


HTTP_MESSAGES = [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
HTTP_TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]


@pytest.mark.parametrize("chat, http", [
    ({}, {}),
    ({"tool_choice": pb.ToolChoice(mode="none")}, {"tool_choice": "none"}),
    ({"tool_choice": pb.ToolChoice(mode="required")}, {"tool_choice": "required"}),
    ({"tool_choice": pb.ToolChoice(mode="required"), "parallel_tool_calls": False},
     {"tool_choice": "required", "parallel_tool_calls": False}),
    ({"tool_choice": pb.ToolChoice(function="get_time")},
     {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
])
def test_chat_tools_read_as_the_http_api_reads_them(chat, http):
    limits = Limits("tiny", reasoning_parser="qwen3")
    got = grpc_server.parse_proto(proto_chat(**chat), limits)
    want = parse_chat({"messages": HTTP_MESSAGES, "tools": HTTP_TOOLS, "max_tokens": 40, **http}, limits)
    assert (got.messages, got.tools, got.tool_format, got.reasoning_format, got.params.structured_outputs) == \
        (want.messages, want.tools, want.tool_format, want.reasoning_format, want.params.structured_outputs)
    (request,) = want.generate_requests("x", 0.0)
    assert request_from_proto(proto_chat(**chat), "x", limits).tools == request.tools       # to the template


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("proto, http", [
    (pb.GenerateRequest(response_format=pb.ResponseFormat(type="json_object")),
     {"response_format": {"type": "json_object"}}),
    (pb.GenerateRequest(response_format=pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchema(
        name="a", schema=json.dumps(SCHEMA), strict=True))),
     {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}}),
    (pb.GenerateRequest(response_format=pb.ResponseFormat(type="text")), {"response_format": {"type": "text"}}),
    (pb.GenerateRequest(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(
        json=json.dumps(SCHEMA), disable_any_whitespace=True))),
     {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}),
    (pb.GenerateRequest(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(regex="[a-z]+"))),
     {"structured_outputs": {"regex": "[a-z]+"}}),
    (pb.GenerateRequest(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(
        choice=pb.Choices(choices=["yes", "no"])))), {"structured_outputs": {"choice": ["yes", "no"]}}),
    (pb.GenerateRequest(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(
        grammar='root ::= "a"'))), {"structured_outputs": {"grammar": 'root ::= "a"'}}),
    (pb.GenerateRequest(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(json_object=True))),
     {"structured_outputs": {"json_object": True}}),
])
def test_output_constraints_read_as_the_http_api_reads_them(proto, http):
    proto.prompt = "Hi"
    got = request_from_proto(proto, "x").params.structured_outputs
    assert got == parse_completion({"prompt": "Hi", **http}, Limits("tiny")).params.structured_outputs
    assert (got is None) == (http.get("response_format") == {"type": "text"})


@pytest.mark.parametrize("msg, message", [
    (proto_chat(tool_choice=pb.ToolChoice(function="nope")), "not among the tools"),
    (proto_chat(tool_choice=pb.ToolChoice(mode="always")), "tool_choice"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Hi")],
                                     tools=[pb.Tool(name="f", parameters="{not json")])), "tools[0].parameters"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Hi")],
                                     tools=[pb.Tool(name="bad name")])), "tools[0].function.name"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="tool", content="18C")])), "tool_call_id"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Hi", tool_calls=[
        pb.ToolCall(name="f")])])), "only assistant messages"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Hi")]),
                        response_format=pb.ResponseFormat(type="json_object"),
                        sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(regex="a"))),
     "only one structured output constraint"),
    (pb.GenerateRequest(chat=proto_chat(tool_choice=pb.ToolChoice(mode="required")).chat,
                        response_format=pb.ResponseFormat(type="json_object")), "cannot be combined"),
    (pb.GenerateRequest(prompt="Hi", response_format=pb.ResponseFormat(type="xml")), "response_format.type"),
    (pb.GenerateRequest(prompt="Hi", response_format=pb.ResponseFormat(type="json_schema")), "json_schema"),
    (pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(
        structured_outputs=pb.StructuredOutputs())), "structured"),
])
def test_bad_chat_fields_raise_with_the_http_apis_message(msg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        request_from_proto(msg, "grpc-1")


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
    tool_call_parser: str = "hermes"
    reasoning_parser: str | None = None

    @property
    def limits(self) -> Limits:
        return Limits(self.served_model_name, self.max_n, sampling_defaults=self.sampling_defaults,
                      tool_call_parser=self.tool_call_parser, reasoning_parser=self.reasoning_parser)


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
                yield [item]
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


def text_items(text: str, index: int = 0, finish: str = "stop") -> list[ReplyItem]:
    """The text as the detokenizer sends it: a few characters an item, the last one finishing."""
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    return [ReplyItem("grpc-0", index, i, p, [100 + i], prompt_tokens=7,
                      finish_reason=finish if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]


CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {})]


def calls_of(responses) -> list[tuple[str, dict]]:
    calls = [c for r in responses for c in r.tool_calls]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_tool_calls_stream_parsed_out_of_the_text():
    client = FakeClient(text_items(CALL_TEXT))
    responses = run_with_server(client, lambda stub, _: collect(stub, proto_chat()))
    assert "".join(r.text for r in responses) == "Let me look."
    assert calls_of(responses) == CALLS
    assert [r.finish_reason for r in responses] == [""] * (len(responses) - 1) + ["tool_calls"]
    # Each call comes whole in the response whose text closed it, beside the tokens of that text.
    closing = [i for i, r in enumerate(responses) if r.tool_calls]
    ends = [CALL_TEXT.index("</tool_call>", start) + len("</tool_call>") - 1
            for start in (0, CALL_TEXT.index("get_time"))]
    assert [end // 3 for end in ends] == closing
    assert [list(r.token_ids) for r in responses] == [[100 + i] for i in range(len(responses))]
    assert responses[-1].usage.completion_tokens == len(responses)
    assert json.loads(client.requests[0].tools) == HTTP_TOOLS


def test_whole_completions_hold_their_text_calls_and_tokens():
    other = "No tools needed."
    client = FakeClient(text_items(CALL_TEXT) + text_items(other, index=1, finish="length"))
    msg = proto_chat()
    msg.whole, msg.sampling_params.n = True, 2
    responses = run_with_server(client, lambda stub, _: collect(stub, msg))
    assert [r.index for r in responses] == [0, 1]
    first, second = responses
    assert (first.text, calls_of([first]), first.finish_reason) == ("Let me look.", CALLS, "tool_calls")
    assert (second.text, list(second.tool_calls), second.finish_reason) == (other, [], "length")
    assert list(first.token_ids) == [100 + i for i in range(len(text_items(CALL_TEXT)))]
    assert (first.usage.completion_tokens, second.usage.completion_tokens) == \
        (len(first.token_ids), len(second.token_ids))
    # The same calls the HTTP API answers for the same text, ids included.
    http = ResponseBuilder(parse_chat({"messages": HTTP_MESSAGES, "tools": HTTP_TOOLS}, Limits("tiny")), "grpc-0", 0,
                           TokenText())
    for item in text_items(CALL_TEXT):
        http.add(0, item)
    assert [(c.id, c.name, c.arguments) for c in first.tool_calls] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"])
         for c in http.response()["choices"][0]["message"]["tool_calls"]]


def test_plain_prompts_can_be_whole_too():
    client = FakeClient(text_items("Hello there"))
    msg = pb.GenerateRequest(prompt="Hi", whole=True)
    (response,) = run_with_server(client, lambda stub, _: collect(stub, msg))
    assert (response.text, response.finish_reason, len(response.token_ids)) == ("Hello there", "stop", 4)


def test_reasoning_is_split_from_the_answer():
    text = "<think>sky is blue</think>\n\nBlue."
    msg = pb.GenerateRequest(chat=pb.Chat(messages=[pb.Message(role="user", content="Color of the sky?")]))
    settings = Settings(reasoning_parser="qwen3")
    streamed = run_with_server(FakeClient(text_items(text)), lambda stub, _: collect(stub, msg), settings)
    assert ("".join(r.reasoning_content for r in streamed), "".join(r.text for r in streamed)) == \
        ("sky is blue", "Blue.")
    assert streamed[-1].finish_reason == "stop"
    msg.whole = True
    (whole,) = run_with_server(FakeClient(text_items(text)), lambda stub, _: collect(stub, msg), settings)
    assert (whole.reasoning_content, whole.text) == ("sky is blue", "Blue.")
    # Without the parser the text is all content, as it came.
    (plain,) = run_with_server(FakeClient(text_items(text)), lambda stub, _: collect(stub, msg))
    assert (plain.reasoning_content, plain.text) == ("", text)


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
