"""The tokenizer service: N replicas in one consumer group turn requests into validated token ids.

Each request goes through the engine's InputProcessor (chat template, tokenization, the checks against the
vocabulary and max_model_len), as LLMEngine.add_request's do; the requests read together go through it together
(one tokenizer call for all their texts). An invalid request is answered with an error straight to its gateway
and never reaches the scheduler. A valid one is forwarded to the scheduler, and what the
detokenizers will need (the gateway, the prompt's tail, the stop strings) is stored under the request's key, all
in one transaction with the acknowledgement. A request outside the value ranges no well-behaved gateway sends
(GenerateRequest.validate, against the model's vocabulary and max_model_len) is dead-lettered, and its gateway
answered with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from engine.input_processor import InputProcessor, PromptInput
from engine.model_files import resolve_max_model_len, resolve_model
from engine.structured_output import Grammars
from engine.tokenizer import eos_token_ids, load_tokenizer
from schemas.codec import SchemaError, decode, encode
from schemas.limits import Limits
from schemas.messages import ChatMessage, GenerateRequest, RequestMeta, ScheduleRequest
from services.runtime import keep_running, setup_logging, stop_event
from services.transport import Reclaimer, Transport, Trimmer, instance_id

log = logging.getLogger("pagestream.tokenizer")

GROUP = "tokenizer"
PROMPT_TAIL = 8                    # prompt tokens kept for the detokenizer's decoding context
META_TTL_S = 24 * 3600             # a request's metadata outlives any request; finished ones delete it


class TokenizerService:
    def __init__(self, transport: Transport, input_processor: InputProcessor):
        self.transport, self.input_processor = transport, input_processor
        self.names = transport.names
        self.consumer = instance_id("tokenizer")
        self.limits = Limits(input_processor.vocab_size, input_processor.max_model_len)

    def run(self, stop) -> None:
        reclaim = Reclaimer(self.transport, self.names.tokenize, GROUP, self.consumer)
        trim = Trimmer(self.transport, [self.names.tokenize])
        log.info("tokenizer %s ready", self.consumer)

        def iteration() -> None:
            trim()
            self.handle(reclaim() + self.transport.read([self.names.tokenize], GROUP, self.consumer, 32, 200))

        keep_running(stop, iteration, "tokenizer", self.transport)

    def handle(self, entries) -> None:
        """The entries read together: each is decoded and checked on its own (a malformed one is dead-lettered
        alone), their prompts go through the input processor together (one tokenizer call for their texts), and
        the replies, forwards and acknowledgements land in one transaction."""
        if not entries:
            return
        took = time.time()
        accepted: list[tuple[bytes, GenerateRequest]] = []
        for entry in entries:
            try:
                request = decode(GenerateRequest, entry.payload)
            except SchemaError as e:               # nobody to answer: keep it for inspection
                self.transport.dead_letter(self.names.tokenize, GROUP, entry.id, entry.payload, str(e))
                continue
            try:
                request.validate(self.limits)
            except SchemaError as e:               # kept for inspection; the client hears why
                self.transport.reply_error(request.gateway, request.request_id, str(e))
                self.transport.dead_letter(self.names.tokenize, GROUP, entry.id, entry.payload, str(e))
                continue
            accepted.append((entry.id, request))
        if not accepted:
            return
        pipe = self.transport.pipeline()
        for (entry_id, request), token_ids in zip(accepted, self.tokenize([r for _, r in accepted])):
            if isinstance(token_ids, ValueError):
                self.transport.reply_error(request.gateway, request.request_id, str(token_ids), pipe)
                continue
            meta = RequestMeta(request.request_id, request.gateway, len(token_ids), token_ids[-PROMPT_TAIL:],
                               request.params)
            pipe.set(self.names.request_meta(request.request_id), encode(meta), ex=META_TTL_S)
            forward = ScheduleRequest(request.request_id, request.gateway, token_ids, request.params,
                                      request.arrival, request.priority, request.epoch, tokenizer_took=took,
                                      beam_search=request.beam_search, probe=request.probe)
            self.transport.publish(self.names.schedule, encode(forward), pipe)
        self.transport.ack(self.names.tokenize, GROUP, [entry_id for entry_id, _ in accepted], pipe)
        pipe.execute()

    def tokenize(self, requests: list[GenerateRequest]) -> list[list[int] | ValueError]:
        """Each request's prompt as token ids, or a ValueError with a message fit for its client."""
        results: list = [None] * len(requests)
        inputs: list[tuple[int, PromptInput]] = []
        for i, request in enumerate(requests):
            try:
                inputs.append((i, _prompt_input(request)))
            except ValueError as e:
                results[i] = e
        for (i, _), token_ids in zip(inputs, self.input_processor.process_batch([p for _, p in inputs])):
            results[i] = token_ids
        return results


def _prompt_input(request: GenerateRequest) -> PromptInput:
    messages = None if request.messages is None else [_template_message(m) for m in request.messages]
    tools = None
    if request.tools is not None:
        try:
            tools = json.loads(request.tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"tools is not valid JSON: {e}") from None
    return PromptInput(request.params, request.prompt, request.prompt_token_ids, messages,
                       request.add_generation_prompt, tools)


def _template_message(m: ChatMessage) -> dict:
    """A message as chat templates read it (OpenAI's shape): tool calls with their arguments as an object, which
    is what templates that render calls expect (Qwen's, Llama 3's write them with tojson)."""
    message = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                 for c in m.tool_calls]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> int:
    setup_logging("tokenizer")
    files = resolve_model(args.model, args.load_format, progress=False)
    # Without a tokenizer (dummy weights), prompts must come as token ids (as with vLLM's skip_tokenizer_init).
    tokenizer = load_tokenizer(files, args.tokenizer)
    transport = Transport(args.redis_url, args.prefix, partitions=args.partitions)
    max_model_len = resolve_max_model_len(files.config, args.max_model_len)
    # Structured-output specs are compiled here to be validated (a bad one is the client's 400); the worker
    # compiles its own (engine/structured_output.py says why).
    grammars = Grammars(tokenizer, files.config["vocab_size"], eos_token_ids(files, tokenizer))
    processor = InputProcessor(tokenizer, max_model_len, files.config["vocab_size"], grammars=grammars)
    TokenizerService(transport, processor).run(stop_event())
    return 0
