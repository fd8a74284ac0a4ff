"""engine/input_processor.py, the one input path: text, token ids and chat conversations become validated prompt
token ids, every refusal has one clear message, and unseeded requests get reproducible seeds. LLMEngine and the
tokenizer service both go through it."""
from __future__ import annotations

import pytest

from engine.input_processor import InputProcessor
from engine.model_files import resolve_model
from engine.tokenizer import load_tokenizer
from schemas.messages import ChatMessage, GenerateRequest
from schemas.sampling_params import SamplingParams

VOCAB = 49152                      # SmolLM2's
LIMIT = 64                         # max_model_len of the processors below
PARAMS = SamplingParams(max_tokens=8)
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m-instruct", progress=False))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return InputProcessor(tokenizer, LIMIT, VOCAB)


def test_text_token_ids_and_chat(processor, tokenizer):
    assert processor.process(PARAMS, prompt="Hello world") == tokenizer.encode("Hello world") == [19556, 905]
    assert processor.process(PARAMS, prompt_token_ids=(5, 6, 7)) == [5, 6, 7]
    chat = processor.process(PARAMS, messages=HELLO)
    text = tokenizer.decode(chat, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    no_prompt = processor.process(PARAMS, messages=HELLO, add_generation_prompt=False)
    assert tokenizer.decode(no_prompt, skip_special_tokens=False).endswith("Hi<|im_end|>\n")
    # Messages win over token ids, token ids over text (the engine keeps a text prompt for display only).
    assert processor.process(PARAMS, prompt="Hello", prompt_token_ids=[9], messages=HELLO) == chat
    assert processor.process(PARAMS, prompt="Hello", prompt_token_ids=[9]) == [9]


@pytest.mark.parametrize("request_kwargs,message", [
    (dict(), "a prompt or messages is required"),
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt_token_ids=[]), "the prompt is empty"),
    (dict(messages=[]), "messages must not be empty"),
    (dict(prompt_token_ids=[1, -1, 2]), f"prompt token ids must be integers in [0, {VOCAB}), got [-1]"),
    (dict(prompt_token_ids=[VOCAB - 1, VOCAB, 10**9]), f"must be integers in [0, {VOCAB}), got [{VOCAB}, {10**9}]"),
    (dict(prompt_token_ids=[1, 2.0, "3"]), "must be integers in [0, 49152), got [2.0, '3']"),
])
def test_each_refusal_has_one_clear_message(processor, request_kwargs, message):
    with pytest.raises(ValueError) as refused:
        processor.process(PARAMS, **request_kwargs)
    assert message in str(refused.value)


def test_prompt_and_max_tokens_must_fit_the_context(processor):
    assert len(processor.process(SamplingParams(max_tokens=8), prompt_token_ids=[5] * 56)) == 56    # 56 + 8 = 64
    with pytest.raises(ValueError) as refused:
        processor.process(SamplingParams(max_tokens=8), prompt_token_ids=[5] * 57)
    assert str(refused.value) == ("This model's maximum context length is 64 tokens. However, you requested 65 "
                                  "tokens (57 in the prompt, 8 for the completion). Please reduce the prompt or "
                                  "max_tokens.")
    # max_tokens None generates up to the limit: one token must still fit.
    assert len(processor.process(SamplingParams(max_tokens=None), prompt_token_ids=[5] * 63)) == 63
    with pytest.raises(ValueError, match=r"requested 65 tokens \(64 in the prompt, 1 for the completion\)"):
        processor.process(SamplingParams(max_tokens=None), prompt_token_ids=[5] * 64)


def test_a_tokenizer_larger_than_the_vocabulary_is_caught(tokenizer):
    small = InputProcessor(tokenizer, LIMIT, vocab_size=1000)
    with pytest.raises(ValueError, match=r"in \[0, 1000\), got \[19556\]"):
        small.process(PARAMS, prompt="Hello world")


def test_without_a_tokenizer_only_token_ids(processor):
    bare = InputProcessor(None, LIMIT, VOCAB)
    assert bare.process(PARAMS, prompt_token_ids=[1, 2]) == [1, 2]
    for kwargs in (dict(prompt="Hello"), dict(messages=HELLO)):
        with pytest.raises(ValueError, match="runs without a tokenizer .*: send the prompt as token ids"):
            bare.process(PARAMS, **kwargs)


def test_chat_template_errors_are_value_errors(tokenizer):
    strict = load_tokenizer(resolve_model("smollm2-135m-instruct", progress=False))
    strict.hf.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ValueError, match="does not fit the model's chat template: Conversation roles must alternate"):
        InputProcessor(strict, LIMIT, VOCAB).process(PARAMS, messages=HELLO)
    strict.hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template; use a completion prompt"):
        InputProcessor(strict, LIMIT, VOCAB).process(PARAMS, messages=HELLO)


def test_seeds(tokenizer):
    a, b = InputProcessor(tokenizer, LIMIT, VOCAB, seed=3), InputProcessor(tokenizer, LIMIT, VOCAB, seed=3)
    assert a.seed(SamplingParams(seed=11)) == 11                       # a request's own seed is kept
    draws = [a.seed(SamplingParams()) for _ in range(3)]
    assert draws == [b.seed(SamplingParams()) for _ in range(3)]     # reproducible from the processor's seed
    assert len(set(draws)) == 3 and all(0 <= s < 2**63 for s in draws)
    assert InputProcessor(tokenizer, LIMIT, VOCAB, seed=4).seed(SamplingParams()) != draws[0]


# ---- one path for every entrypoint -----------------------------------------------------------------------------
def test_the_engine_and_the_tokenizer_service_share_the_processor(tmp_path, redis_url):
    from transformers import LlamaConfig

    from conftest import TINY
    from engine import LLM
    from services.tokenizer import TokenizerService
    from services.transport import Transport

    LlamaConfig(**{**TINY, "max_position_embeddings": LIMIT}).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), load_format="dummy", tokenizer="smollm2-135m-instruct", progress=False)
    engine = llm.engine
    service = TokenizerService(Transport(redis_url, "inputs"), InputProcessor(engine.tokenizer, LIMIT, VOCAB))
    assert type(engine.input_processor) is type(service.input_processor) is InputProcessor

    def via_service(**kwargs) -> list[int]:
        ids = service.tokenize([GenerateRequest(request_id="r", gateway="g", params=PARAMS, arrival=0.0, **kwargs)])[0]
        if isinstance(ids, ValueError):
            raise ids
        return ids

    assert via_service(prompt="Hello world") == engine.input_processor.process(PARAMS, prompt="Hello world")
    assert via_service(messages=[ChatMessage("user", "Hi")]) == engine.input_processor.process(PARAMS, messages=HELLO)
    out = llm.chat(HELLO, SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert out.prompt_token_ids == via_service(messages=[ChatMessage("user", "Hi")])
    for kwargs in (dict(prompt_token_ids=[5] * 60), dict(prompt_token_ids=[VOCAB])):
        with pytest.raises(ValueError) as by_service:
            via_service(**kwargs)
        with pytest.raises(ValueError) as by_engine:
            engine.add_request("x", kwargs["prompt_token_ids"], PARAMS)
        assert str(by_service.value) == str(by_engine.value)
    assert not engine.has_unfinished_requests()


def test_the_scheduler_service_refuses_a_stray_prompt_with_an_error_reply(redis_url):
    """A ScheduleRequest the tokenizer service would never send (empty, too long, out of the vocabulary) gets the
    input processor's message back at its gateway; the scheduler stays empty and seeds the valid one."""
    import uuid

    from engine.config import SchedulerConfig
    from schemas.codec import SchemaError, decode
    from schemas.messages import Reply, ScheduleRequest, WorkerInfo
    from services.scheduler import SchedulerService
    from services.transport import FIELD, Transport

    transport = Transport(redis_url, prefix=f"sched-{uuid.uuid4().hex[:6]}")
    names = transport.names
    transport.redis.set(names.alive("worker", "w0"), "e1")
    transport.register_worker(WorkerInfo("w0", "e1", 64, 16, LIMIT, VOCAB, [2]))
    service = SchedulerService(transport, SchedulerConfig(), enable_prefix_caching=True, seed=7)
    service._track_workers()
    assert type(service.input_processor) is InputProcessor

    def schedule(rid: str, ids: list[int]) -> None:
        pipe = transport.pipeline()
        try:
            service._on_request(ScheduleRequest(rid, "gw", ids, PARAMS, arrival=0.0), 0.0, pipe)
        finally:
            pipe.execute()

    stray = {"empty": [], "long": [5] * 60, "oov": [VOCAB]}
    for rid, ids in stray.items():
        with pytest.raises(SchemaError, match="schedule.prompt"):       # the caller dead-letters it
            schedule(rid, ids)
    schedule("ok", [5, 6, 7])
    replies = [decode(Reply, fields[FIELD]).items[0] for _, fields in transport.redis.xrange(names.reply("gw"))]
    expected = {}
    for rid, ids in stray.items():
        with pytest.raises(ValueError) as refused:
            InputProcessor(None, LIMIT, VOCAB).process(PARAMS, prompt_token_ids=ids)
        expected[rid] = str(refused.value)
    assert {r.request_id: r.error.message for r in replies} == expected
    assert list(service.workers["w0"].scheduler.requests) == ["ok"]
    assert service.workers["w0"].scheduler.requests["ok"][0].seed == InputProcessor(None, LIMIT, VOCAB, seed=7).seed(PARAMS)
