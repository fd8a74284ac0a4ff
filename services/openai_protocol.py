"""The OpenAI API on the wire, as users of vLLM's OpenAI server know it: request parsing and validation, and the
shapes of responses, stream chunks and errors.

    parsed = parse_completion(body, limits)             # or parse_chat; a bad request raises ProtocolError
    builder = ResponseBuilder(parsed, response_id, created, token_text)
    chunk = builder.add(prompt_index, reply_item)       # streaming: a chunk (or None); otherwise accumulates
    body = builder.response()                           # non-streaming: the whole completion

Pure functions of plain values, no I/O: every shape here is unit-tested without a server.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.beam_search_params import MAX_BEAM_WIDTH, BeamSearchParams, check_beam_search
from schemas.messages import (ChatMessage, ChatToolCall, ErrorInfo, GenerateRequest, PromptLogprobsWire,
                              ReplyItem, TokenLogprobsWire)
from schemas.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from schemas.structured_outputs import StructuredOutputsParams
from services.reasoning import REASONING_PARSERS, ReasoningExtractor, ReasoningFormat
from services.tool_calls import (TOOL_CALL_PARSERS, Content, ToolCall, ToolCallExtractor, ToolCallFormat,
                                forced_tool_calls)

Prompt = str | list[int]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}
MODEL_NOT_FOUND = "model_not_found"
INT64 = 1 << 63                         # msgpack carries 64-bit integers: anything larger cannot cross the wire

SSE_DONE = b"data: [DONE]\n\n"


# ---- errors ----------------------------------------------------------------------------------------------------
def error_body(message: str, code: int = 400, type: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object; `code` is the HTTP status (as vLLM sends it)."""
    return {"error": {"message": message, "type": type or ERROR_TYPES.get(code, "invalid_request_error"),
                      "param": param, "code": code}}


def pipeline_error_body(error: ErrorInfo) -> dict:
    """The body for an error the pipeline sent (a ReplyItem's)."""
    return error_body(error.message, error.code, error.type, error.param)


class ProtocolError(Exception):
    """A request the API refuses: its HTTP status and OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type = status, param, type

    def body(self) -> dict:
        return error_body(str(self), self.status, self.type, self.param)


# ---- the request body ------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> float:
    raise ProtocolError(f"{name} is not a valid JSON number")


def decode_json_body(raw: bytes) -> dict:
    """The body as a JSON object. Strict: UTF-8 only (json.loads would guess UTF-16/32 from bytes), and no
    NaN/Infinity, which Python's json accepts but JSON does not (and an infinite temperature would pass the
    range checks)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"the request body is not valid UTF-8 (at byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    return body


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "a list",
               dict: "an object"}


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _field(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked against kind (absent or null: default). JSON booleans are not numbers here, integers
    must fit in 64 bits, and strings must be encodable (a lone surrogate escape, "\\ud800", is valid JSON but
    cannot be sent on)."""
    value = body.get(name)
    if value is None:
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, kind))
    if not ok:
        raise ProtocolError(f"{name} must be {_KIND_NAMES[kind]}, got {_json_type(value)}", param=name)
    if kind is int:
        _check_int64(value, name)
    elif kind is float:
        value = float(value)
    elif kind is str:
        _check_text(value, name)
    return value


def _check_int64(value: int, param: str) -> None:
    if not -INT64 <= value < INT64:
        raise ProtocolError(f"{param} is out of range (64-bit integers)", param=param)


def _check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{param} contains an unpaired surrogate", param=param) from None


def _token_ids(value: Any, param: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ProtocolError(f"{param} must be a list of integers", param=param)
    if any(not 0 <= t < INT64 for t in value):
        raise ProtocolError(f"{param}: token ids must be non-negative 64-bit integers", param=param)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError("stop must be a string or a list of strings", param="stop")
    for s in stop:
        _check_text(s, "stop")
    return stop


# Features that, ignored, would silently change the answer: refuse them instead.
_UNSUPPORTED = ("suffix", "guided_whitespace_pattern")


def _reject_unsupported(body: dict) -> None:
    for name in _UNSUPPORTED:
        if body.get(name):
            raise ProtocolError(f"{name} is not supported by this server", param=name)


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: an object mapping token ids (as strings: JSON keys) to biases in [-100, 100]."""
    value = _field(body, "logit_bias", dict)
    if value is None:
        return None
    bias = {}
    for key, b in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ProtocolError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        token = int(key)
        _check_int64(token, "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise ProtocolError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                f"got {b!r} for token {key}", param="logit_bias")
        bias[token] = float(b)
    return bias


def _strings(body: dict, name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{name} must be a list of strings", param=name)
    for s in value:
        _check_text(s, name)
    return value


# ---- structured outputs ----------------------------------------------------------------------------------------
# vLLM's structured_outputs object: its constraint fields, and the options taken. disable_fallback asks for no
# fallback between grammar backends: there is one (xgrammar), so it holds whatever its value.
_STRUCTURED_FIELDS = {"json": (dict, str), "regex": (str,), "choice": (list,), "grammar": (str,),
                      "json_object": (bool,), "structural_tag": (dict, str), "disable_any_whitespace": (bool,),
                      "disable_fallback": (bool,)}
# vLLM's older top-level fields, each one constraint.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_JSON_SCHEMA_FIELDS = {"name", "description", "schema", "strict"}


def parse_structured_outputs(body: dict) -> StructuredOutputsParams | None:
    """The request's output constraint, from whichever way the client sent it: OpenAI's response_format
    (json_object, json_schema), vLLM's structured_outputs object, or vLLM's older guided_* fields. At most one
    constraint per request. Whether it compiles is the tokenizer's to say (400 with xgrammar's message)."""
    found: list[tuple[str, dict]] = []            # (the parameter it came in, StructuredOutputsParams kwargs)
    response_format = _field(body, "response_format", dict)
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            found.append(("response_format", {"json": _json_schema(response_format.get("json_schema"))}))
        elif kind != "text":
            raise ProtocolError("response_format.type must be text, json_object or json_schema, got "
                                f"{kind!r}", param="response_format")
    options = _field(body, "structured_outputs", dict)
    if options is not None:
        for name, value in options.items():
            kinds = _STRUCTURED_FIELDS.get(name)
            if kinds is None:
                raise ProtocolError(f"structured_outputs.{name} is not supported (supported: "
                                    f"{', '.join(sorted(_STRUCTURED_FIELDS))})", param="structured_outputs")
            if value is not None and not isinstance(value, kinds):
                raise ProtocolError(f"structured_outputs.{name} must be "
                                    f"{' or '.join(_KIND_NAMES[k] for k in kinds)}, got {_json_type(value)}",
                                    param="structured_outputs")
        found.append(("structured_outputs",
                      {k: v for k, v in options.items() if v is not None and k != "disable_fallback"}))
    for name, kind in _GUIDED_FIELDS.items():
        value = body.get(name)
        if value is not None:
            if not isinstance(value, _STRUCTURED_FIELDS[kind]):
                raise ProtocolError(f"{name} must be "
                                    f"{' or '.join(_KIND_NAMES[k] for k in _STRUCTURED_FIELDS[kind])}, got "
                                    f"{_json_type(value)}", param=name)
            found.append((name, {kind: value}))
    if len(found) > 1:
        raise ProtocolError("only one structured output constraint per request, got "
                            f"{' and '.join(name for name, _ in found)}", param=found[1][0])
    if not found:
        return None
    param, kwargs = found[0]
    try:
        spec = StructuredOutputsParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise ProtocolError(str(e), param=param) from None
    for text in (spec.json, spec.regex, spec.grammar, spec.structural_tag, *(spec.choice or [])):
        if text is not None:
            _check_text(text, param)
    return spec


def _json_schema(value: Any) -> dict:
    """response_format's json_schema object ({"name", "schema", "strict", "description"}): its schema."""
    if not isinstance(value, dict):
        raise ProtocolError("response_format.json_schema must be an object with a schema", param="response_format")
    unknown = set(value) - _JSON_SCHEMA_FIELDS
    if unknown:
        raise ProtocolError(f"response_format.json_schema: unknown field(s) {', '.join(sorted(unknown))}",
                            param="response_format")
    schema = value.get("schema")
    if not isinstance(schema, dict):
        raise ProtocolError("response_format.json_schema.schema must be a JSON schema object",
                            param="response_format")
    return schema


@dataclass
class Limits:
    """What the server's configuration adds to the API's own checks."""
    served_model_name: str
    max_n: int = 16
    max_model_len: int | None = None
    # What a request gets for the sampling fields it leaves out (engine.model_files.sampling_defaults: the
    # model's generation_config.json or its card's advice), before OpenAI's own defaults.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    tool_call_parser: str = "hermes"        # how the model writes tool calls (services/tool_calls.py)
    reasoning_parser: str | None = None     # how it writes its thinking (services/reasoning.py); None: as content


@dataclass
class ParsedRequest:
    """A validated completion or chat request; one pipeline request per prompt."""
    chat: bool
    model: str
    params: SamplingParams
    prompts: list[Prompt] = field(default_factory=list)          # completions
    messages: list[ChatMessage] = field(default_factory=list)    # chat
    add_generation_prompt: bool = True
    stream: bool = False
    include_usage: bool = False
    echo: list[str] | None = None          # completions with echo: each prompt's text, put before its choices
    priority: int = 0
    beam_search: BeamSearchParams | None = None     # use_beam_search: params.n of beam_width beams come back
    tools: list[dict] | None = None        # chat: the functions offered, for the chat template
    tool_format: ToolCallFormat | None = None   # chat: the format tool calls are parsed out of the output in
    reasoning_format: ReasoningFormat | None = None   # chat: the format the thinking is split from the answer in
    legacy_functions: bool = False         # chat sent OpenAI's deprecated functions: one call, as function_call

    @property
    def num_prompts(self) -> int:
        return 1 if self.chat else len(self.prompts)

    def generate_requests(self, request_id: str, arrival: float) -> list[GenerateRequest]:
        """The pipeline requests: `request_id` itself for one prompt, `<request_id>-<i>` for each of several."""
        def request(rid: str, **prompt) -> GenerateRequest:
            return GenerateRequest(request_id=rid, gateway="", params=self.params, arrival=arrival,
                                   priority=self.priority, add_generation_prompt=self.add_generation_prompt,
                                   beam_search=self.beam_search, **prompt)

        if self.chat:
            tools = None if self.tools is None else json.dumps(self.tools, ensure_ascii=False)
            return [request(request_id, messages=self.messages, tools=tools)]
        return [request(rid, prompt=p) if isinstance(p, str) else request(rid, prompt_token_ids=p)
                for rid, p in zip(self.request_ids(request_id), self.prompts)]

    def request_ids(self, request_id: str) -> list[str]:
        """The pipeline requests' ids (see generate_requests)."""
        return [request_id] if self.num_prompts == 1 else [f"{request_id}-{i}" for i in range(self.num_prompts)]


def _common(body: dict, limits: Limits, *, max_tokens: int | None, logprobs: int | None) -> dict:
    """The fields completions and chat share, checked, as ParsedRequest keyword arguments."""
    _reject_unsupported(body)
    model = _field(body, "model", str, limits.served_model_name)
    if model != limits.served_model_name:
        raise ProtocolError(f"The model `{model}` does not exist.", status=404, param="model", type=MODEL_NOT_FOUND)
    stream = _field(body, "stream", bool, False)
    stream_options = _field(body, "stream_options", dict)
    if stream_options is not None and not stream:
        raise ProtocolError("stream_options can only be set when stream is true", param="stream_options")
    include_usage = _field(stream_options or {}, "include_usage", bool, False)
    n = _field(body, "n", int, 1)
    if n > limits.max_n:
        raise ProtocolError(f"n must be at most {limits.max_n}, got {n}", param="n")
    if max_tokens is not None and limits.max_model_len is not None and max_tokens > limits.max_model_len:
        raise ProtocolError(f"max_tokens ({max_tokens}) exceeds the model's context length "
                            f"({limits.max_model_len})", param="max_tokens")
    stop_token_ids = _token_ids(body.get("stop_token_ids") or [], "stop_token_ids")
    allowed = body.get("allowed_token_ids")
    allowed = None if allowed is None else _token_ids(allowed, "allowed_token_ids")
    best_of = _field(body, "best_of", int)
    if best_of is not None and best_of > limits.max_n:
        raise ProtocolError(f"best_of must be at most {limits.max_n}, got {best_of}", param="best_of")
    if stream and best_of is not None and best_of > n and not body.get("use_beam_search"):
        raise ProtocolError("best_of > n cannot be streamed: which completions are returned is known only at the "
                            "end", param="best_of")
    prompt_logprobs = _field(body, "prompt_logprobs", int)
    if stream and prompt_logprobs is not None:
        raise ProtocolError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    default = limits.sampling_defaults
    try:
        params = SamplingParams(
            n=n, best_of=best_of, temperature=_field(body, "temperature", float, default.get("temperature", 1.0)),
            top_p=_field(body, "top_p", float, default.get("top_p", 1.0)),
            top_k=_field(body, "top_k", int, int(default.get("top_k", 0))),
            min_p=_field(body, "min_p", float, default.get("min_p", 0.0)),
            seed=_field(body, "seed", int), presence_penalty=_field(body, "presence_penalty", float, 0.0),
            frequency_penalty=_field(body, "frequency_penalty", float, 0.0),
            repetition_penalty=_field(body, "repetition_penalty", float, default.get("repetition_penalty", 1.0)),
            max_tokens=max_tokens,
            min_tokens=_field(body, "min_tokens", int, 0), stop=_stop(body), stop_token_ids=stop_token_ids,
            ignore_eos=_field(body, "ignore_eos", bool, False), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=_field(body, "include_stop_str_in_output", bool, False),
            skip_special_tokens=_field(body, "skip_special_tokens", bool, True),
            logit_bias=_logit_bias(body), allowed_token_ids=allowed, bad_words=_strings(body, "bad_words"),
            structured_outputs=parse_structured_outputs(body))
    except ValueError as e:
        raise ProtocolError(str(e)) from None
    return dict(model=model, params=params, stream=stream, include_usage=include_usage,
                priority=_field(body, "priority", int, 0), beam_search=_beam_search(body, params, n))


def _beam_search(body: dict, params: SamplingParams, n: int) -> BeamSearchParams | None:
    """vLLM's extension use_beam_search: n beams returned of best_of (or n); length_penalty. The sampling
    fields beam search cannot honour are refused (check_beam_search says which)."""
    length_penalty = _field(body, "length_penalty", float, 1.0)
    if not _field(body, "use_beam_search", bool, False):
        if length_penalty != 1.0:
            raise ProtocolError("length_penalty needs use_beam_search", param="length_penalty")
        return None
    if body.get("temperature") not in (None, 0):
        raise ProtocolError("temperature must be 0 (or left out) with use_beam_search", param="temperature")
    width = _field(body, "best_of", int, n)
    if not 1 <= width <= MAX_BEAM_WIDTH:
        raise ProtocolError(f"the beam width (best_of, or n) must be in [1, {MAX_BEAM_WIDTH}], got {width}",
                            param="best_of")
    if width < n:
        raise ProtocolError(f"best_of ({width}) must be at least n ({n}) with use_beam_search", param="best_of")
    params.best_of = None                  # the beam width, not completions to choose among
    # Beam search ranks the model's own log-probabilities: the model's sampling defaults do not apply to it.
    params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty = 0.0, 1.0, 0, 0.0, 1.0
    for name, neutral in {"top_p": (1,), "top_k": (0, -1), "min_p": (0,), "repetition_penalty": (1,)}.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ProtocolError(f"{name} cannot be used with use_beam_search", param=name)
    beam = BeamSearchParams(width, params.max_tokens, params.ignore_eos, 0.0, length_penalty)
    try:
        check_beam_search(params, beam)
    except ValueError as e:
        raise ProtocolError(str(e)) from None
    return beam


def _prompts(value: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists: each one prompt."""
    if isinstance(value, str):
        prompts: list = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = value
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        prompts = [_token_ids(value, "prompt")]
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        prompts = [_token_ids(p, "prompt") for p in value]
    elif value is None or value == []:
        raise ProtocolError("prompt is required", param="prompt")
    else:
        raise ProtocolError("prompt must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists", param="prompt")
    for p in prompts:
        if not p:
            raise ProtocolError("prompt must not be empty", param="prompt")
        if isinstance(p, str):
            _check_text(p, "prompt")
    return prompts


def parse_completion(body: dict, limits: Limits, token_text: TokenText | None = None) -> ParsedRequest:
    """POST /v1/completions. token_text decodes token-id prompts for echo."""
    logprobs = _field(body, "logprobs", int)
    common = _common(body, limits, max_tokens=_field(body, "max_tokens", int, 16), logprobs=logprobs)
    prompts = _prompts(body.get("prompt"))
    echo = None
    if _field(body, "echo", bool, False):
        if logprobs is not None:        # the echoed prompt's tokens carry their logprobs too
            params = common["params"]
            params.prompt_logprobs = max(params.prompt_logprobs or 0, logprobs)
        if any(not isinstance(p, str) for p in prompts) and (token_text is None or not token_text.can_decode):
            raise ProtocolError("echo of token-id prompts needs the model's tokenizer, which this server lacks",
                                param="echo")
        echo = [p if isinstance(p, str) else token_text.decode(p) for p in prompts]
    return ParsedRequest(chat=False, prompts=prompts, echo=echo, **common)


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (joined); null counts as empty (an assistant
    message that only called tools)."""
    if value is None:
        return ""
    if isinstance(value, str):
        _check_text(value, param)
        return value
    if not isinstance(value, list):
        raise ProtocolError(f"{param} must be a string or a list of content parts", param=param)
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ProtocolError(f"{param}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                "supported", param=param)
        _check_text(part["text"], param)
        texts.append(part["text"])
    return "".join(texts)


def parse_messages(value: Any) -> list[ChatMessage]:
    """A chat's messages, as OpenAI's API sends them (the deprecated function-calling turns too)."""
    if not isinstance(value, list) or not value:
        raise ProtocolError("messages must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ProtocolError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role == "function" or m.get("function_call") is not None:
            messages.append(_legacy_message(m, i, messages))
            continue
        if role not in CHAT_ROLES:
            raise ProtocolError(f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES | {'function'}))}, "
                                f"got {role!r}", param=f"messages[{i}].role")
        messages.append(ChatMessage(role=role, content=_content(m.get("content"), f"messages[{i}].content"),
                                    tool_calls=_message_tool_calls(m, i), tool_call_id=_tool_call_id(m, i)))
    return messages


def _legacy_message(m: dict, i: int, earlier: list[ChatMessage]) -> ChatMessage:
    """The deprecated function-calling turns, as the tool-calling ones the chat template knows: an assistant's
    function_call ({name, arguments}) becomes its one tool call, and a "function" message (the function's
    result, with its name) the tool message answering the last call made before it."""
    content = _content(m.get("content"), f"messages[{i}].content")
    if m.get("role") == "function":
        param = f"messages[{i}].name"
        if not isinstance(m.get("name"), str) or not m["name"]:
            raise ProtocolError(f"{param} is required in a function message (the function whose result it is)",
                                param=param)
        called = next((call for message in reversed(earlier) for call in reversed(message.tool_calls or ())), None)
        if called is None:
            raise ProtocolError(f"messages[{i}]: a function message answers an earlier assistant message's "
                                "function_call, and there is none", param=f"messages[{i}]")
        return ChatMessage(role="tool", content=content, tool_call_id=called.id)
    param = f"messages[{i}].function_call"
    if m.get("role") != "assistant" or m.get("tool_calls") is not None:
        raise ProtocolError(f"{param}: only assistant messages without tool_calls have a function_call",
                            param=param)
    call = m["function_call"]
    if (not isinstance(call, dict) or not isinstance(call.get("name"), str)
            or not isinstance(call.get("arguments", ""), str)):
        raise ProtocolError(f"{param} must be {{\"name\": ..., \"arguments\": JSON text}}", param=param)
    for text in (call["name"], call.get("arguments", "")):
        _check_text(text, param)
    # The call's id: none came with it, and a tool message must name the one it answers.
    return ChatMessage(role="assistant", content=content,
                       tool_calls=[ChatToolCall(id=f"call_{i}", name=call["name"],
                                                arguments=call.get("arguments", ""))])


def _message_tool_calls(m: dict, i: int) -> list[ChatToolCall] | None:
    """An assistant message's tool_calls, as the API returned them: [{id, type, function: {name, arguments}}]."""
    value, param = m.get("tool_calls"), f"messages[{i}].tool_calls"
    if value is None:
        return None
    if m.get("role") != "assistant":
        raise ProtocolError(f"{param}: only assistant messages have tool calls", param=param)
    if not isinstance(value, list):
        raise ProtocolError(f"{param} must be a list", param=param)
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(call.get("id", ""), str)
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments", ""), str)):
            raise ProtocolError(f"{param}: each call must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                                "{\"name\": ..., \"arguments\": JSON text}}", param=param)
        for text in (call.get("id", ""), function["name"], function.get("arguments", "")):
            _check_text(text, param)
        calls.append(ChatToolCall(id=call.get("id", ""), name=function["name"],
                                  arguments=function.get("arguments", "")))
    return calls


def _tool_call_id(m: dict, i: int) -> str | None:
    value, param = m.get("tool_call_id"), f"messages[{i}].tool_call_id"
    if m.get("role") != "tool":
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{param} is required in a tool message (the id of the call it answers)", param=param)
    _check_text(value, param)
    return value


# ---- tools -----------------------------------------------------------------------------------------------------
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}


def _tools(body: dict) -> list[dict] | None:
    """The tools: OpenAI's [{"type": "function", "function": {name, description, parameters, strict}}]."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ProtocolError("tools must be a list of function tools", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ProtocolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}",
                                param="tools")
    _check_functions([tool["function"] for tool in tools], "tools", lambda i: f"tools[{i}].function")
    return tools


def _check_functions(functions: list[dict], param: str, where) -> None:
    """Function definitions ({name, description, parameters, strict}); where(i): how a message names the i-th."""
    names = set()
    for i, function in enumerate(functions):
        unknown = set(function) - _FUNCTION_FIELDS
        if unknown:
            raise ProtocolError(f"{where(i)}: unknown field(s) {', '.join(sorted(unknown))}", param=param)
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ProtocolError(f"{where(i)}.name must be 1 to 64 letters, digits, '_', '-' or '.', got "
                                f"{name!r}", param=param)
        if name in names:
            raise ProtocolError(f"{where(i)}: two {param} named {name!r}", param=param)
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise ProtocolError(f"{where(i)}.description must be a string", param=param)
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ProtocolError(f"{where(i)}.parameters must be a JSON schema object", param=param)
    _check_text(json.dumps(functions), param)


def _legacy_functions(body: dict) -> dict:
    """OpenAI's deprecated functions and function_call, as the tools and tool_choice they stand for."""
    for newer, older in (("tools", "functions"), ("tool_choice", "function_call"),
                         ("parallel_tool_calls", "functions")):
        if body.get(newer) is not None:
            raise ProtocolError(f"{newer} cannot be combined with {older} (the deprecated form of tools; "
                                "send tools and tool_choice only)", param=older)
    functions = body.get("functions")
    if functions is None:
        raise ProtocolError("function_call needs functions", param="function_call")
    if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
        raise ProtocolError("functions must be a list of function objects ({\"name\": ..., \"description\": "
                            "..., \"parameters\": {...}})", param="functions")
    _check_functions(functions, "functions", lambda i: f"functions[{i}]")
    call = body.get("function_call")
    if call is None or call in ("none", "auto"):
        choice = call
    elif isinstance(call, dict) and set(call) == {"name"} and isinstance(call["name"], str):
        if call["name"] not in {f["name"] for f in functions}:
            raise ProtocolError(f"function_call names the function {call['name']!r}, which is not among the "
                                "functions", param="function_call")
        choice = {"type": "function", "function": {"name": call["name"]}}
    else:
        raise ProtocolError("function_call must be none, auto or {\"name\": ...}", param="function_call")
    return {"tools": [{"type": "function", "function": f} for f in functions], "tool_choice": choice,
            "parallel_tool_calls": False}


def _tool_choice(body: dict, tools: list[dict] | None) -> str | None:
    """tool_choice as "none", "auto", "required", or the name of the function it forces ({"type": "function",
    "function": {"name": ...}})."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ProtocolError(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                                param="tool_choice")
        if choice == "required" and not tools:
            raise ProtocolError("tool_choice required needs tools", param="tool_choice")
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ProtocolError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}", param="tool_choice")
    if function["name"] not in {t["function"]["name"] for t in tools or []}:
        raise ProtocolError(f"tool_choice names the function {function['name']!r}, which is not among the tools",
                            param="tool_choice")
    return {"name": function["name"]}


def parse_chat(body: dict, limits: Limits) -> ParsedRequest:
    """POST /v1/chat/completions."""
    # max_completion_tokens is the newer name; where both are given it wins (as in OpenAI's API). Neither:
    # up to the context length.
    legacy, newer = _field(body, "max_tokens", int), _field(body, "max_completion_tokens", int)
    max_tokens = newer if newer is not None else legacy
    top_logprobs = _field(body, "top_logprobs", int)
    wants_logprobs = _field(body, "logprobs", bool, False)
    if top_logprobs is not None and not wants_logprobs:
        raise ProtocolError("top_logprobs requires logprobs to be true", param="top_logprobs")
    common = _common(body, limits, max_tokens=max_tokens,
                     logprobs=(top_logprobs or 0) if wants_logprobs else None)
    return ParsedRequest(chat=True, messages=parse_messages(body.get("messages")),
                         add_generation_prompt=_field(body, "add_generation_prompt", bool, True),
                         reasoning_format=REASONING_PARSERS.get(limits.reasoning_parser),
                         **parse_tools(body, common["params"], limits), **common)


def parse_tools(body: dict, params: SamplingParams, limits: Limits) -> dict:
    """A chat's tools, tool_choice and parallel_tool_calls (or the deprecated functions and function_call), as
    ParsedRequest's keyword arguments: the tools for the chat template, the format calls are parsed out of the
    output in (None: they are not), and whether to answer in the legacy shape. tool_choice required or a named
    function holds params to calls, by a grammar. The one reading of them, for the HTTP and the gRPC APIs."""
    legacy_functions = body.get("functions") is not None or body.get("function_call") is not None
    fields = _legacy_functions(body) if legacy_functions else body      # the legacy form makes one call at most
    tools = _tools(fields)
    tool_choice = _tool_choice(fields, tools)
    parallel = _field(fields, "parallel_tool_calls", bool, True)
    tool_format = None
    if tool_choice != "none":
        tool_format = TOOL_CALL_PARSERS[limits.tool_call_parser]
        if tool_choice != "auto":          # "required" or a named function: the grammar allows only calls
            if params.structured_outputs is not None:
                raise ProtocolError("tool_choice required or a named function cannot be combined with another "
                                    "structured output constraint", param="tool_choice")
            try:
                params.structured_outputs = forced_tool_calls(
                    tool_format, tools, tool_choice["name"] if isinstance(tool_choice, dict) else None, parallel)
            except ValueError as e:
                raise ProtocolError(str(e), param="tools") from None
        if tool_format.start_is_special:
            params.skip_special_tokens = False       # [TOOL_CALLS]: the parser must see it
    return dict(tools=tools, tool_format=tool_format, legacy_functions=legacy_functions)


# ---- /tokenize and /detokenize (vLLM's) -------------------------------------------------------------------------
@dataclass
class TokenizeRequest:
    prompt: str | None = None
    messages: list[dict] | None = None          # through the chat template, as a chat request's
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


def _check_model(body: dict, limits: Limits) -> None:
    model = _field(body, "model", str, limits.served_model_name)
    if model != limits.served_model_name:
        raise ProtocolError(f"The model `{model}` does not exist.", status=404, param="model", type=MODEL_NOT_FOUND)


def parse_tokenize(body: dict, limits: Limits) -> TokenizeRequest:
    """POST /tokenize: a prompt, or chat messages, tokenized as a completion or chat request would be. As vLLM:
    special tokens (BOS) are added to a prompt, not to a rendered chat template, which holds its own."""
    _check_model(body, limits)
    return_token_strs = _field(body, "return_token_strs", bool, False)
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise ProtocolError("give either prompt or messages, not both", param="prompt")
        messages = [{"role": m.role, "content": m.content} for m in parse_messages(body["messages"])]
        return TokenizeRequest(messages=messages, add_special_tokens=_field(body, "add_special_tokens", bool, False),
                               add_generation_prompt=_field(body, "add_generation_prompt", bool, True),
                               return_token_strs=return_token_strs)
    prompt = _field(body, "prompt", str)
    if prompt is None:
        raise ProtocolError("prompt (a string) or messages is required", param="prompt")
    return TokenizeRequest(prompt=prompt, add_special_tokens=_field(body, "add_special_tokens", bool, True),
                           return_token_strs=return_token_strs)


def parse_detokenize(body: dict, limits: Limits) -> list[int]:
    """POST /detokenize: the token ids to turn back into text."""
    _check_model(body, limits)
    if body.get("tokens") is None:
        raise ProtocolError("tokens (a list of token ids) is required", param="tokens")
    return _token_ids(body["tokens"], "tokens")


# ---- token strings, for logprobs -------------------------------------------------------------------------------
class Detokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class TokenText:
    """Token id -> the text logprobs show for it: the id decoded alone (cached; the vocabulary bounds the cache).
    Without a tokenizer (dummy weights), "token_id:<id>" as vLLM's --return-tokens-as-token-ids writes it."""

    def __init__(self, tokenizer: Detokenizer | None = None):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    @property
    def can_decode(self) -> bool:
        return self._tokenizer is not None

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tokenizer.decode([token_id], skip_special_tokens=False) if self._tokenizer is not None
                    else f"token_id:{token_id}")
            self._cache[token_id] = text
        return text

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobsWire], token_text: TokenText,
                        text_offset: int, top_n: int | None = None) -> dict:
    """The legacy completions shape for some tokens of a choice; text_offset: where the first one starts in the
    choice's text. top_logprobs maps token text -> logprob and always holds the sampled token too, so it has up
    to k+1 entries (as OpenAI documents); top_n: at most that many alternatives of each entry's."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    top = []
    for token, entry in zip(tokens, entries):
        alternatives = {token_text(t): lp for t, lp in zip(entry.top_token_ids[:top_n], entry.top_logprobs[:top_n])}
        alternatives.setdefault(token, entry.logprob)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}


def prompt_logprobs(prompt: PromptLogprobsWire | None, token_text: TokenText, top_n: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token, null for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the top_n most likely in its place."""
    if prompt is None:
        return []
    shaped: list[dict | None] = [None]
    for token, entry, rank in zip(prompt.token_ids[1:], prompt.logprobs, prompt.ranks):
        top = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": token_text(t)}
               for r, (t, lp) in enumerate(zip(entry.top_token_ids[:top_n], entry.top_logprobs[:top_n]))}
        top.setdefault(str(token), {"logprob": entry.logprob, "rank": rank, "decoded_token": token_text(token)})
        shaped.append(top)
    return shaped


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobsWire], token_text: TokenText,
                  top_n: int) -> list[dict]:
    """The chat shape (choice.logprobs.content): per token its text, logprob, UTF-8 bytes and top_n
    alternatives."""
    return [{**_chat_token(token_text(t), e.logprob),
             "top_logprobs": [_chat_token(token_text(a), lp)
                              for a, lp in zip(e.top_token_ids[:top_n], e.top_logprobs[:top_n])]}
            for t, e in zip(token_ids, entries)]


# ---- responses -------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# One encoder for every chunk: json.dumps with options other than the defaults builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def sse(payload: dict, event_id: str | None = None) -> bytes:
    """One server-sent event, serialized once, compactly; with its id (services/resumable.py) where it has one."""
    data = b"data: " + _ENCODER.encode(payload).encode() + b"\n\n"
    return data if event_id is None else b"id: " + event_id.encode() + b"\n" + data


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)            # non-streaming: the text pieces
    logprobs: list[dict] | dict | None = None                 # non-streaming: accumulated logprobs
    text_offset: int = 0                                      # completions logprobs: characters so far
    echo: str | None = None                                   # the prompt, until the choice's first text
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0                           # best_of: the n returned score highest
    tool_calls: ToolCallExtractor | None = None               # chat with tools: the calls parsed out of the text
    calls_sent: int = 0                                       # streaming: the calls sent so far
    reasoning: ReasoningExtractor | None = None               # chat with a reasoning parser: the thinking split off


def tool_call_id(response_id: str, choice: int, call: int) -> str:
    """A call's id: random-looking, as OpenAI's are, but a function of where it is, so a resumed stream (which
    replays the reply through a new builder) gives the same ids."""
    return "call_" + hashlib.sha256(f"{response_id}/{choice}/{call}".encode()).hexdigest()[:24]


class ResponseBuilder:
    """Turns one API request's ReplyItems into its stream chunks, or into its whole response.

    A choice's index is prompt_index * n + the item's index. An item whose text is empty (bytes held back by
    the detokenizer) makes no chunk, unless it ends its choice or carries requested logprobs. With best_of > n
    (never streamed) best_of choices per prompt are collected, and the response holds the n of highest
    cumulative logprob."""

    def __init__(self, request: ParsedRequest, response_id: str, created: int, token_text: TokenText):
        self.request, self.response_id = request, response_id
        self.n = request.params.num_sequences          # completions generated per prompt
        self.top_logprobs = request.params.logprobs
        self.token_text = token_text
        self.echo_logprobs = request.echo is not None and self.top_logprobs is not None
        self.prompt_logprobs: list[PromptLogprobsWire | None] = [None] * request.num_prompts
        self.choices = [_Choice() for _ in range(request.num_prompts * self.n)]
        for choice in self.choices:
            if request.tool_format is not None:
                choice.tool_calls = ToolCallExtractor(request.tool_format)
            if request.reasoning_format is not None:
                choice.reasoning = ReasoningExtractor(request.reasoning_format)
        if request.echo is not None:
            for i, choice in enumerate(self.choices):
                choice.echo = request.echo[i // self.n]
        self.prompt_tokens = [0] * request.num_prompts
        self.cached_tokens = [0] * request.num_prompts
        self.completion_tokens = 0
        obj = ("chat.completion.chunk" if request.chat else "text_completion") if request.stream else \
            ("chat.completion" if request.chat else "text_completion")
        self._head = {"id": response_id, "object": obj, "created": created, "model": request.model}
        if request.include_usage:
            self._head["usage"] = None          # OpenAI: every chunk has "usage": null, the last one the totals

    def start(self) -> list[dict]:
        """Chunks that open a chat stream: each choice's role."""
        if not self.request.chat:
            return []
        return [{**self._head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
                for i in range(len(self.choices))]

    def choice_index(self, prompt_index: int, item: ReplyItem) -> int:
        return prompt_index * self.n + item.index

    def add(self, prompt_index: int, item: ReplyItem) -> dict | None:
        """Takes one item; streaming, returns its chunk (None: nothing to show). Not for requests that parse tool
        calls, where one item may make several chunks (add_chunks)."""
        chunks = self.add_chunks(prompt_index, item)
        assert len(chunks) <= 1, "a request that parses tool calls streams through add_chunks"
        return chunks[0] if chunks else None

    def add_chunks(self, prompt_index: int, item: ReplyItem) -> list[dict]:
        """Takes one item; streaming, returns its chunks (none: nothing to show)."""
        index = self.choice_index(prompt_index, item)
        choice = self.choices[index]
        if item.prompt_tokens:
            self.prompt_tokens[prompt_index] = item.prompt_tokens
            self.cached_tokens[prompt_index] = item.cached_tokens
        self.completion_tokens += len(item.token_ids)
        if item.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = item.prompt_logprobs
        if item.logprobs:
            choice.cumulative_logprob += sum(e.logprob for e in item.logprobs)
        text, echoed = item.text, None
        if choice.echo is not None:
            text, choice.echo = choice.echo + text, None
            if self.echo_logprobs and item.prompt_logprobs is not None:
                echoed = self._echo_logprobs(choice, item.prompt_logprobs)
        if item.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = item.finish_reason, item.stop_reason
        logprobs = self._logprobs(choice, item)
        if echoed is not None:
            logprobs = echoed if logprobs is None else {k: echoed[k] + logprobs[k] for k in echoed}
        if not self.request.stream:
            choice.parts.append(text)
            if logprobs is not None:
                self._keep_logprobs(choice, logprobs)
            return []
        if choice.tool_calls is not None or choice.reasoning is not None:
            return self._parsed_chunks(index, choice, item, text, logprobs)
        if not text and logprobs is None and item.finish_reason is None:
            return []
        if self.request.chat:
            delta = {"content": text} if text else {}
            entry = {"index": index, "delta": delta,
                     "logprobs": None if logprobs is None else {"content": logprobs}}
        else:
            entry = {"index": index, "text": text, "logprobs": logprobs}
        entry["finish_reason"] = item.finish_reason
        entry["stop_reason"] = item.stop_reason
        return [{**self._head, "choices": [entry]}]

    def _split(self, choice: _Choice, text: str, finished: bool) -> tuple[str, list[Content | ToolCall]]:
        """A choice's next text as its reasoning and its answer's events (content and tool calls)."""
        reasoning = ""
        if choice.reasoning is not None:
            reasoning, text = choice.reasoning.feed(text)
            if finished:
                more_reasoning, more_text = choice.reasoning.finish()
                reasoning, text = reasoning + more_reasoning, text + more_text
        if choice.tool_calls is None:
            return reasoning, [Content(text)] if text else []
        events = choice.tool_calls.feed(text)
        return reasoning, events + choice.tool_calls.finish() if finished else events

    def _parsed_chunks(self, index: int, choice: _Choice, item: ReplyItem, text: str,
                       logprobs: list | None) -> list[dict]:
        """A chat stream that splits off reasoning or parses tool calls: the thinking as reasoning_content
        deltas, text outside calls as content deltas; each call, once whole, as OpenAI streams one (a delta with
        its index, id, type, name and empty arguments, then one with the arguments); the last chunk of the choice
        finishes it, with "tool_calls" if it called any."""
        reasoning, events = self._split(choice, text, item.finish_reason is not None)
        deltas: list[dict] = [{"reasoning_content": reasoning}] if reasoning else []
        for event in events:
            if isinstance(event, Content):
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += event.text
                else:
                    deltas.append({"content": event.text})
                continue
            call, choice.calls_sent = choice.calls_sent, choice.calls_sent + 1
            if self.request.legacy_functions:
                if call == 0:                   # the legacy shape holds one call: any further ones are dropped
                    deltas.append({"function_call": {"name": event.name, "arguments": ""}})
                    deltas.append({"function_call": {"arguments": event.arguments}})
                continue
            deltas.append({"tool_calls": [{"index": call, "id": tool_call_id(self.response_id, index, call),
                                           "type": "function", "function": {"name": event.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": call, "function": {"arguments": event.arguments}}]})
        if not deltas and (logprobs is not None or item.finish_reason is not None):
            deltas.append({})
        chunks = []
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            finish = self._finish_reason(item.finish_reason, choice.calls_sent > 0) if last else None
            chunks.append({**self._head, "choices": [{
                "index": index, "delta": delta,
                "logprobs": {"content": logprobs} if i == 0 and logprobs is not None else None,
                "finish_reason": finish, "stop_reason": item.stop_reason if last else None}]})
        return chunks

    def _logprobs(self, choice: _Choice, item: ReplyItem) -> dict | list | None:
        if self.top_logprobs is None or not item.token_ids or item.logprobs is None:
            return None
        if self.request.chat:
            return chat_logprobs(item.token_ids, item.logprobs, self.token_text, self.top_logprobs)
        shaped = completion_logprobs(item.token_ids, item.logprobs, self.token_text, choice.text_offset)
        if shaped["tokens"]:
            choice.text_offset = shaped["text_offset"][-1] + len(shaped["tokens"][-1])
        return shaped

    def _echo_logprobs(self, choice: _Choice, prompt: PromptLogprobsWire) -> dict:
        """The legacy completions shape for the echoed prompt's tokens: the first has no logprob (null)."""
        shaped = completion_logprobs(prompt.token_ids[1:], prompt.logprobs, self.token_text, 0, self.top_logprobs)
        first = self.token_text(prompt.token_ids[0])
        offsets = [choice.text_offset] + [choice.text_offset + len(first) + o for o in shaped["text_offset"]]
        choice.text_offset = offsets[-1] + len(shaped["tokens"][-1] if shaped["tokens"] else first)
        return {"tokens": [first] + shaped["tokens"], "token_logprobs": [None] + shaped["token_logprobs"],
                "top_logprobs": [None] + shaped["top_logprobs"], "text_offset": offsets}

    @staticmethod
    def _keep_logprobs(choice: _Choice, logprobs: dict | list) -> None:
        if choice.logprobs is None:
            choice.logprobs = logprobs
        elif isinstance(logprobs, list):
            choice.logprobs.extend(logprobs)
        else:
            for key, values in logprobs.items():
                choice.logprobs[key].extend(values)

    def _message(self, index: int, choice: _Choice, text: str) -> dict:
        """A chat choice's message: its text, or, where tool calls are parsed, the calls and the text around them
        (null if none)."""
        if choice.tool_calls is None and choice.reasoning is None:
            return {"role": "assistant", "content": text}
        # Fresh extractors: the whole text at once, so the body is the same however often it is asked for.
        whole = _Choice(tool_calls=choice.tool_calls and ToolCallExtractor(self.request.tool_format),
                        reasoning=choice.reasoning and ReasoningExtractor(self.request.reasoning_format))
        reasoning, events = self._split(whole, text, finished=True)
        content = "".join(e.text for e in events if isinstance(e, Content))
        calls = [{"id": tool_call_id(self.response_id, index, k), "type": "function",
                  "function": {"name": e.name, "arguments": e.arguments}}
                 for k, e in enumerate(e for e in events if not isinstance(e, Content))]
        message = {"role": "assistant", "content": content}
        if choice.reasoning is not None:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["content"] = content if content.strip() else None
            if self.request.legacy_functions:       # one call, without an id (any further ones are dropped)
                message["function_call"] = calls[0]["function"]
            else:
                message["tool_calls"] = calls
        return message

    def _finish_reason(self, reason: str | None, called: bool) -> str | None:
        """A choice that stopped after calling a function finished to call it ("length" stays: the last call
        may be cut)."""
        if reason != "stop" or not called:
            return reason
        return "function_call" if self.request.legacy_functions else "tool_calls"

    def usage(self) -> dict:
        return usage(sum(self.prompt_tokens), self.completion_tokens, sum(self.cached_tokens))

    def usage_chunk(self) -> dict:
        return {**self._head, "choices": [], "usage": self.usage()}

    def _returned(self) -> list[tuple[int, _Choice]]:
        """(prompt index, choice) of the choices the response holds: all, or the best n of each prompt's
        best_of by cumulative logprob (vLLM V0's choice), best first."""
        returned, n = self.request.params.n, self.n
        if returned == n:
            return [(i // n, c) for i, c in enumerate(self.choices)]
        return [(p, c) for p in range(self.request.num_prompts)
                for c in sorted(self.choices[p * n:(p + 1) * n], key=lambda c: c.cumulative_logprob,
                                reverse=True)[:returned]]

    def response(self) -> dict:
        """The non-streaming body, once every choice finished."""
        choices = []
        k = self.request.params.prompt_logprobs
        for index, (prompt_index, c) in enumerate(self._returned()):
            text = "".join(c.parts)
            if self.request.chat:
                entry = {"index": index, "message": self._message(index, c, text),
                         "logprobs": None if c.logprobs is None else {"content": c.logprobs}}
            else:
                entry = {"index": index, "text": text, "logprobs": c.logprobs}
                if k is not None:
                    entry["prompt_logprobs"] = prompt_logprobs(self.prompt_logprobs[prompt_index], self.token_text, k)
            message = entry.get("message", {})
            entry["finish_reason"] = self._finish_reason(c.finish_reason,
                                                         "tool_calls" in message or "function_call" in message)
            entry["stop_reason"] = c.stop_reason
            choices.append(entry)
        body = {**self._head, "choices": choices, "usage": self.usage()}
        if self.request.chat and k is not None:
            body["prompt_logprobs"] = prompt_logprobs(self.prompt_logprobs[0], self.token_text, k)
        return body


def models_list(name: str, root: str, created: int, max_model_len: int | None) -> dict:
    """GET /v1/models: the one served model."""
    return {"object": "list", "data": [model_card(name, root, created, max_model_len)]}


def model_card(name: str, root: str, created: int, max_model_len: int | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "pagestream", "root": root,
            "parent": None, "max_model_len": max_model_len}


# ---- the OpenAPI document (GET /openapi.json) ------------------------------------------------------------------
def _one_of(*schemas: dict) -> dict:
    return {"oneOf": list(schemas)}


_STRING_OR_STRINGS = _one_of({"type": "string"}, {"type": "array", "items": {"type": "string"}})
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


def _sampling_fields(limits: Limits) -> dict:
    """The request fields completions and chat share, with the ranges _common and SamplingParams accept."""
    max_tokens = {"type": "integer", "minimum": 1, "nullable": True}
    if limits.max_model_len is not None:
        max_tokens["maximum"] = limits.max_model_len
    return {
        "model": {"type": "string", "enum": [limits.served_model_name], "description": "the served model"},
        "max_tokens": max_tokens,
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                           "description": "only with stream: true"},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "description": "-1 or 0: no top-k"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": -INT64, "maximum": INT64 - 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        "min_tokens": {"type": "integer", "minimum": 0, "description": "at most max_tokens"},
        "stop": _STRING_OR_STRINGS,
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "ignore_eos": {"type": "boolean"},
        "include_stop_str_in_output": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"},
        "priority": {"type": "integer", "description": "lower is served first"},
        "use_beam_search": {"type": "boolean", "description": "vLLM: the best n beams of a beam search of width "
                            f"best_of (or n, at most {MAX_BEAM_WIDTH}); temperature 0 or left out, no sampling "
                            "filters, penalties, stop strings or logprobs; streamed, the beams come when it ends"},
        "length_penalty": {"type": "number", "description": "with use_beam_search: a beam's score is its cumulative "
                           "logprob / length ** length_penalty"},
        "user": {"type": "string"},
        "best_of": {"type": "integer", "minimum": 1, "maximum": limits.max_n, "nullable": True,
                    "description": "at least n: the n of highest cumulative logprob are returned; not with stream "
                                   "when above n"},
        "logit_bias": {"type": "object", "nullable": True, "description": "token id -> bias added to its logit",
                       "propertyNames": {"pattern": "^[0-9]{1,18}$"},
                       "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                "maximum": MAX_LOGIT_BIAS}},
        "allowed_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                              "nullable": True, "description": "only these tokens may be sampled"},
        "bad_words": {"type": "array", "items": {"type": "string", "pattern": "\\S"},
                      "description": "words never generated"},
        "prompt_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True,
                            "description": "each prompt token's logprob and the top k; not with stream"},
        # Structured outputs: at most one of these per request (a spec that does not compile: 400).
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "required": ["schema"], "properties": {
                "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": "boolean", "nullable": True}}}}},
        "structured_outputs": {"type": "object", "description": "vLLM's: exactly one of json, regex, choice, "
                               "grammar, json_object, structural_tag", "additionalProperties": False, "properties": {
            "json": _one_of({"type": "object"}, {"type": "string"}), "regex": {"type": "string"},
            "choice": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            "grammar": {"type": "string", "description": "EBNF, start rule root"},
            "json_object": {"type": "boolean"},
            "structural_tag": _one_of({"type": "object"}, {"type": "string"}),
            "disable_any_whitespace": {"type": "boolean"}, "disable_fallback": {"type": "boolean"}}},
        "guided_json": _one_of({"type": "object"}, {"type": "string"}),
        "guided_regex": {"type": "string"},
        "guided_choice": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        "guided_grammar": {"type": "string", "description": "EBNF, start rule root"},
    }


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _json_response(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


_ERRORS = {str(status): _json_response(ERROR_TYPES[status], {"$ref": "#/components/schemas/Error"})
           for status in (400, 401, 404, 413, 429, 503)}


def openapi_schema(limits: Limits, api_keys: bool, metrics_keys: bool) -> dict:
    """The OpenAPI 3.0 document of the HTTP API this server answers (services/gateway.py's routes); api_keys,
    metrics_keys: whether the API, /metrics take a bearer key. The request schemas say what parse_completion and
    parse_chat accept; a request they allow may still be refused for what a schema cannot say (a prompt longer
    than the context, min_tokens over max_tokens): 400, never a 5xx."""
    bearer = [{"bearer": []}] if api_keys else []
    sampling = _sampling_fields(limits)
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    content = {"nullable": True, **_one_of({"type": "string"}, {"type": "array", "items": text_part})}
    tool_calls = {"type": "array", "description": "the calls the assistant made", "items": {
        "type": "object", "required": ["function"], "properties": {
            "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "arguments": {"type": "string"}}}}}}
    # One shape per role, as _messages accepts them: only an assistant message has tool calls, and a tool
    # message must say which call it answers. The deprecated function calling's turns: an assistant's
    # function_call, and a "function" message with its result (after an assistant message that called one).
    speakers = sorted(CHAT_ROLES - {"assistant", "tool"})
    function_call = {"type": "object", "required": ["name"], "description": "deprecated: tool_calls",
                     "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}
    message = _one_of(
        {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
            "role": {"type": "string", "enum": speakers}, "content": content}},
        {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
            "role": {"type": "string", "enum": ["assistant"]}, "content": content, "tool_calls": tool_calls}},
        {"type": "object", "required": ["role", "function_call"], "additionalProperties": False, "properties": {
            "role": {"type": "string", "enum": ["assistant"]}, "content": content, "function_call": function_call}},
        {"type": "object", "required": ["role", "tool_call_id"], "additionalProperties": False, "properties": {
            "role": {"type": "string", "enum": ["tool"]}, "content": content,
            "tool_call_id": {"type": "string", "description": "the call this answers"}}},
        {"type": "object", "required": ["role", "name"], "additionalProperties": False, "description":
            "deprecated: a tool message", "properties": {
                "role": {"type": "string", "enum": ["function"]}, "content": content,
                "name": {"type": "string", "minLength": 1, "description": "the function whose result this is"}}})
    function = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": {"type": "string"},
        "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}
    tool = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"type": "string", "enum": ["function"]}, "function": function}}
    completion = {"type": "object", "required": ["prompt"], "properties": {
        **sampling,
        "prompt": _one_of({"type": "string", "minLength": 1},
                          {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                          _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}),
        "echo": {"type": "boolean", "description": "the prompt before the completion (with logprobs: the prompt's "
                                                "tokens' too)"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True},
    }}
    chat = {"type": "object", "required": ["messages"], "properties": {
        **sampling,
        "messages": {"type": "array", "items": message, "minItems": 1},
        "max_completion_tokens": sampling["max_tokens"],
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True,
                         "description": "only with logprobs: true"},
        "add_generation_prompt": {"type": "boolean"},
        "tools": {"type": "array", "items": tool},
        "tool_choice": _one_of({"type": "string", "enum": ["none", "auto", "required"]},
                               {"type": "object", "required": ["type", "function"], "properties": {
                                   "type": {"type": "string", "enum": ["function"]},
                                   "function": {"type": "object", "required": ["name"],
                                                "properties": {"name": {"type": "string"}}}}}),
        "parallel_tool_calls": {"type": "boolean"},
        "functions": {"type": "array", "items": function, "description": "deprecated: tools (not with them); "
                      "a call comes back as message.function_call"},
        "function_call": _one_of({"type": "string", "enum": ["none", "auto"]},
                                 {"type": "object", "required": ["name"], "additionalProperties": False,
                                  "properties": {"name": {"type": "string"}}}),
    }}
    tokenize = {"type": "object", "properties": {
        "model": sampling["model"],
        "prompt": {"type": "string"},
        "messages": {"type": "array", "items": message, "minItems": 1},
        "add_special_tokens": {"type": "boolean", "description": "default: true with prompt, false with messages"},
        "add_generation_prompt": {"type": "boolean"},
        "return_token_strs": {"type": "boolean"},
    }, "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}], "description": "prompt or messages"}
    detokenize = {"type": "object", "required": ["tokens"], "properties": {
        "model": sampling["model"], "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}
    generation = {"200": _json_response("the completion; with stream: true, server-sent events (text/event-stream) "
                                        "of chunks ending with data: [DONE]"), **_ERRORS}
    plain = {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    resume = [{"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
               "description": "the id of the last event a broken stream delivered: the same request sent again "
                            "with it continues that stream (services/resumable.py)"}]
    return {
        "openapi": "3.0.3",
        "info": {"title": "pagestream", "version": "1", "description": "OpenAI-compatible API (with vLLM's "
                 "sampling extensions), health and metrics."},
        "paths": {
            "/v1/completions": {"post": {"operationId": "createCompletion", "security": bearer, "parameters": resume,
                                         "requestBody": _json_body(completion), "responses": generation}},
            "/v1/chat/completions": {"post": {"operationId": "createChatCompletion", "security": bearer,
                                              "parameters": resume, "requestBody": _json_body(chat),
                                              "responses": generation}},
            "/tokenize": {"post": {"operationId": "tokenize", "security": bearer, "requestBody": _json_body(tokenize),
                                   "responses": {"200": _json_response("count, max_model_len, tokens (and "
                                                                       "token_strs)"), **_ERRORS}}},
            "/detokenize": {"post": {"operationId": "detokenize", "security": bearer,
                                     "requestBody": _json_body(detokenize),
                                     "responses": {"200": _json_response("prompt: the text"), **_ERRORS}}},
            "/v1/models": {"get": {"operationId": "listModels", "security": bearer,
                                   "responses": {"200": _json_response("the served model"), "401": _ERRORS["401"]}}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "security": bearer,
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json_response("the model"), "401": _ERRORS["401"], "404": _ERRORS["404"]}}},
            "/health": {"get": {"operationId": "health", "responses": {"200": _json_response("serving")}}},
            "/health/ready": {"get": {"operationId": "ready", "responses": {
                "200": _json_response("a request made it through the pipeline (checked at most once a second)"),
                "503": _json_response("the pipeline cannot serve")}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [{"bearer": []}] if metrics_keys else [],
                                 "responses": {**plain, "401": _ERRORS["401"]},
                                 "description": "Prometheus text format; the metrics key, or else the API key"}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                 "param": {"type": "string", "nullable": True},
                                                 "code": {"type": "integer"}}}}}},
        },
    }
