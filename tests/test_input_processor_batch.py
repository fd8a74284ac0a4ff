"""InputProcessor.process_batch, the input path of requests that come together (LLM.generate's list, what a
tokenizer service reads at once): one tokenizer call for all the texts, and for every request exactly the token
ids, or the error and message, that process() gives it alone. LLM.generate adds all its prompts or none."""
from __future__ import annotations

import pytest

from engine.input_processor import InputProcessor, PromptInput
from engine.model_files import resolve_model
from engine.tokenizer import load_tokenizer
from schemas.sampling_params import SamplingParams

VOCAB = 49152                      # SmolLM2's
LIMIT = 256                        # max_model_len of the processors below
HELLO = [{"role": "user", "content": "Hi"}]
WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
LONE_SURROGATE = "a \ud800 b"      # a str, but not Unicode text: the Rust tokenizer refuses it


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m-instruct", progress=False))


@pytest.fixture(scope="module")
def texts(tokenizer):
    """The w256 benchmark's prompts (random token ids decoded to text, scaled down), and text that is hard on a
    tokenizer: special tokens written out, several scripts, runs of whitespace and digits, nothing at all."""
    from loadtest.datasets import workload_requests
    return [r.prompt for r in workload_requests(tokenizer.hf, "w256", 6, 0.1)] + [
        "Hello world", " leading space", "<|im_start|>user\nHi<|im_end|>", "naïve café ☕ 東京 Привет",
        "tabs\t\tand\n\n\nnewlines   ", "1234567890 3.14159", "", " ", "x" * 300]


def params(**kwargs) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 8, **kwargs})


def one_by_one(processor: InputProcessor, inputs: list[PromptInput]) -> list:
    """The reference: process() on each request alone, an error as (type, message)."""
    results = []
    for r in inputs:
        try:
            results.append(processor.process(r.params, r.prompt, r.prompt_token_ids, r.messages,
                                             r.add_generation_prompt, r.tools))
        except ValueError as e:
            results.append((type(e), str(e)))
    return results


def as_compared(results: list) -> list:
    return [(type(r), str(r)) if isinstance(r, Exception) else r for r in results]


@pytest.mark.parametrize("parallel", ["true", "false"])      # the tests run without it (conftest.py), a server with
def test_encode_batch_is_encode_of_each_text(tokenizer, texts, parallel, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
    for special in (True, False):
        batch = tokenizer.encode_batch(texts, special)
        assert batch == [tokenizer.hf.encode(t, add_special_tokens=special) for t in texts]
        assert all(type(t) is int for ids in batch for t in ids)
    assert tokenizer.encode_batch([]) == []


def test_a_batch_gives_each_request_what_it_gets_alone(tokenizer, texts):
    processor = InputProcessor(tokenizer, LIMIT, VOCAB)
    inputs = [PromptInput(params(), prompt=t) for t in texts] + [
        PromptInput(params(), prompt_token_ids=(5, 6, 7)),
        PromptInput(params(), messages=HELLO),
        PromptInput(params(), messages=HELLO, add_generation_prompt=False),
        PromptInput(params(), messages=HELLO + [{"role": "assistant", "content": "Hello!"}], tools=WEATHER),
        PromptInput(params(), prompt="Hello", prompt_token_ids=[9], messages=HELLO),     # messages win
        PromptInput(params(), prompt="Hello", prompt_token_ids=[9]),                      # then token ids
        # every refusal, in the middle of the batch
        PromptInput(params()),
        PromptInput(params(), messages=[]),
        PromptInput(params(), prompt_token_ids=[]),
        PromptInput(params(), prompt_token_ids=[1, VOCAB, -1, 2.0, "3"]),
        PromptInput(params(), prompt_token_ids=[True, 5]),           # a bool is an int here, as it was
        PromptInput(params(max_tokens=8), prompt_token_ids=[5] * (LIMIT - 8)),
        PromptInput(params(max_tokens=8), prompt_token_ids=[5] * (LIMIT - 7)),
        PromptInput(params(max_tokens=None), prompt="word " * LIMIT),
        PromptInput(params(stop_token_ids=[VOCAB + 1]), prompt="Hello"),
        PromptInput(params(bad_words=["world"]), prompt="Hello world"),
        PromptInput(params(), prompt=LONE_SURROGATE),
        PromptInput(params(), prompt="the last one"),
    ]
    batch = as_compared(processor.process_batch(inputs))
    reference = one_by_one(InputProcessor(tokenizer, LIMIT, VOCAB), inputs)
    assert batch == reference
    refused = [r for r in reference if isinstance(r, tuple)]
    assert len(refused) == 9 and all(kind is ValueError for kind, _ in refused)
    assert (ValueError, "the prompt cannot be tokenized: TextEncodeInput must be Union[TextInputSequence, "
                        "Tuple[InputSequence, InputSequence]]") in refused
    # The texts are the tokenizer's ids of each text, as encode() gives them alone.
    assert batch[:len(texts)] == [tokenizer.encode(t) or (ValueError, "the prompt is empty") for t in texts]
    assert inputs[-3].params.bad_words_token_ids == [tokenizer.encode(w, add_special_tokens=False)
                                                     for w in ("world", " world")]


def test_without_a_tokenizer_a_batch_refuses_text_and_takes_ids():
    bare = InputProcessor(None, LIMIT, VOCAB)
    inputs = [PromptInput(params(), prompt="Hello"), PromptInput(params(), prompt_token_ids=[1, 2]),
              PromptInput(params(), messages=HELLO)]
    assert as_compared(bare.process_batch(inputs)) == one_by_one(InputProcessor(None, LIMIT, VOCAB), inputs)
    assert bare.process_batch(inputs)[1] == [1, 2]


# ---- the engine: one call adds them all, or none --------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from transformers import LlamaConfig

    from conftest import TINY
    from engine import LLM
    path = tmp_path_factory.mktemp("tiny")
    LlamaConfig(**{**TINY, "max_position_embeddings": LIMIT}).save_pretrained(path)
    return LLM(str(path), load_format="dummy", tokenizer="smollm2-135m-instruct", progress=False, max_num_seqs=8)


def test_generate_adds_the_batch_as_each_prompt_alone(llm, texts):
    prompts = [texts[0], "Hello world", [5, 6, 7], HELLO, texts[1]]
    sampling = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
    together = llm.generate(prompts, sampling)
    alone = [llm.generate([p], sampling)[0] for p in prompts]
    assert [o.prompt_token_ids for o in together] == [o.prompt_token_ids for o in alone]
    assert [o.prompt_token_ids for o in together[:2]] == [llm.tokenizer.encode(t) for t in prompts[:2]]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert [o.prompt for o in together] == [texts[0], "Hello world", None, None, texts[1]]


@pytest.mark.parametrize("bad,bad_params", [
    ("", None),                                            # the input processor refuses it
    (LONE_SURROGATE, None),                                # the tokenizer refuses it
    ([5] * LIMIT, None),                                   # too long
    (HELLO, SamplingParams(max_tokens=2, n=9)),            # the scheduler refuses it (n > max_num_seqs)
])
def test_generate_adds_all_or_none_with_the_error_of_the_bad_prompt(llm, bad, bad_params):
    engine = llm.engine
    good = SamplingParams(max_tokens=2, ignore_eos=True)
    with pytest.raises(ValueError) as alone:
        engine.add_request("alone", bad, bad_params or good)
    assert not engine.requests and not engine.has_unfinished_requests()
    with pytest.raises(ValueError) as in_a_batch:
        llm.generate(["Hello world", [5, 6, 7], bad, HELLO, "after it"], [good, good, bad_params or good, good, good])
    assert type(in_a_batch.value) is type(alone.value) and str(in_a_batch.value) == str(alone.value)
    assert not engine.requests and not engine.has_unfinished_requests() and not engine.scheduler.waiting
    assert len(llm.generate(["Hello world", HELLO], good)) == 2          # and the engine goes on serving


# ---- the tokenizer service: what it reads at once --------------------------------------------------------------
def test_the_tokenizer_service_handles_what_it_reads_together(tokenizer, texts, redis_url):
    import uuid

    from schemas.codec import decode, encode
    from schemas.messages import ChatMessage, GenerateRequest, Reply, ScheduleRequest
    from services.tokenizer import GROUP, TokenizerService
    from services.transport import FIELD, Transport

    transport = Transport(redis_url, prefix=f"tok-{uuid.uuid4().hex[:6]}")
    names = transport.names
    service = TokenizerService(transport, InputProcessor(tokenizer, LIMIT, VOCAB))
    requests = {
        "text": dict(prompt=texts[0]), "ids": dict(prompt_token_ids=[5, 6, 7]),
        "chat": dict(messages=[ChatMessage("user", "Hi")]), "empty": dict(prompt=""),
        "tools": dict(messages=[ChatMessage("user", "Hi")], tools="{not json"),
        "long": dict(prompt="word " * LIMIT), "oov": dict(prompt_token_ids=[VOCAB]), "last": dict(prompt="Hello"),
    }
    for rid, kwargs in requests.items():
        transport.publish(names.tokenize, encode(GenerateRequest(request_id=rid, gateway="g", params=params(),
                                                                 arrival=0.0, **kwargs)))
    entries = transport.read([names.tokenize], GROUP, "t0", 32, 100)
    assert len(entries) == len(requests)
    service.handle(entries)

    expected = {rid: service.tokenize([GenerateRequest(request_id=rid, gateway="g", params=params(), arrival=0.0,
                                                       **kwargs)])[0]
                for rid, kwargs in requests.items()}
    single = InputProcessor(tokenizer, LIMIT, VOCAB)
    assert expected["text"] == single.process(params(), prompt=texts[0])
    assert expected["chat"] == single.process(params(), messages=HELLO)
    forwarded = {r.request_id: r.prompt_token_ids
                 for r in (decode(ScheduleRequest, f[FIELD]) for _, f in transport.redis.xrange(names.schedule))}
    assert forwarded == {rid: ids for rid, ids in expected.items() if not isinstance(ids, ValueError)}
    assert set(forwarded) == {"text", "ids", "chat", "last"}
    errors = {item.request_id: item.error.message
              for _, f in transport.redis.xrange(names.reply("g")) for item in decode(Reply, f[FIELD]).items}
    assert errors == {rid: str(e) for rid, e in expected.items() if isinstance(e, ValueError)}
    assert errors["empty"] == "the prompt is empty" and errors["tools"].startswith("tools is not valid JSON")
    assert transport.redis.xpending(names.tokenize, GROUP)["pending"] == 0            # all acknowledged


# ---- bench pipeline's offline run: the requests due together are added together --------------------------------
@pytest.mark.parametrize("rate", [float("inf"), 200.0])
def test_the_offline_bench_adds_what_is_due_together(llm, texts, rate):
    from loadtest.datasets import SampleRequest
    from loadtest.pipeline import offline_load
    requests = [SampleRequest(t, len(llm.tokenizer.encode(t)), 2 + i % 3) for i, t in enumerate(texts[:6])]
    outputs, seconds, _ = offline_load(llm.engine, requests, rate)
    assert [(o.success, o.output_tokens, o.usage_prompt_tokens) for o in outputs] == \
        [(True, r.output_len, r.prompt_len) for r in requests]
    assert all(0 <= o.ttft <= o.e2el <= seconds for o in outputs)
    assert not llm.engine.has_unfinished_requests()
