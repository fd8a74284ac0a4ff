"""engine/output_processor.py, the one output path: token by token, the text that became final (whole UTF-8
characters, cut at stop strings), the finish reason, and whether a stop string must stop the sequence upstream.
LLMEngine and the detokenizer service both go through it; the service rebuilds a completion from its checkpoint."""
from __future__ import annotations

import uuid

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.output_processor import OutputProcessor, TokenOutput
from engine.tokenizer import Tokenizer
from schemas.codec import encode
from schemas.messages import RequestMeta, StepTokens
from schemas.sampling_params import SamplingParams

TEXT = "héllo 日本語 🙂 done"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """Byte-level BPE without merges, saved and loaded as a model's tokenizer: every byte is a token, so a
    multi-byte character spans several tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = RustTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    path = tmp_path_factory.mktemp("byte-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(path)
    return Tokenizer(path)


def run(tokenizer, text: str, params: SamplingParams, finish: tuple[str, int | None] = ("length", None),
        prompt: str = "Q: ") -> list[TokenOutput]:
    """Feed text's tokens one by one; the last one comes with the engine core's finish (unless a stop string
    ended the completion before)."""
    state = OutputProcessor(tokenizer).new_completion(tokenizer.encode(prompt), params)
    ids = tokenizer.encode(text)
    outputs = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        outputs.append(state.add_token(token, *(finish if last else (None, None))))
        if outputs[-1].finish_reason is not None:
            break
    return outputs


def joined(outputs: list[TokenOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_whole_characters_only_and_everything_by_the_end(tokenizer):
    outputs = run(tokenizer, TEXT, SamplingParams())
    assert joined(outputs) == TEXT
    assert all("\ufffd" not in o.text for o in outputs)                     # never half a character
    assert sum(o.text == "" for o in outputs) == len(TEXT.encode()) - len(TEXT)   # continuation bytes wait
    assert [o.token_id for o in outputs] == tokenizer.encode(TEXT)
    assert [(o.finish_reason, o.stop_reason, o.stop_upstream) for o in outputs[-2:]] == [
        (None, None, False), ("length", None, False)]


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_tokens_ends_the_completion(tokenizer, include):
    params = SamplingParams(stop=["STOP", "never"], include_stop_str_in_output=include)
    outputs = run(tokenizer, "one two STOP three", params)
    assert joined(outputs) == ("one two STOP" if include else "one two ")
    assert len(outputs) == len("one two STOP")                  # ended on the token that completed it
    last = outputs[-1]
    assert (last.finish_reason, last.stop_reason, last.stop_upstream) == ("stop", "STOP", True)
    assert not any(o.finish_reason for o in outputs[:-1])


def test_the_first_of_overlapping_stop_strings_wins(tokenizer):
    outputs = run(tokenizer, "xxab yy", SamplingParams(stop=["ab", "b"]))
    assert joined(outputs) == "xx" and outputs[-1].stop_reason == "ab"


def test_a_possible_stop_string_is_held_back_then_released(tokenizer):
    outputs = run(tokenizer, "a <entry", SamplingParams(stop=["<end>"]))
    texts = [o.text for o in outputs]
    assert texts[:5] == ["a", " ", "", "", ""]                  # "<en" might still become "<end>"
    assert texts[5] == "<ent" and joined(outputs) == "a <entry"   # "t" decides it


def test_finishing_flushes_what_waited_for_a_stop_string(tokenizer):
    outputs = run(tokenizer, "a <en", SamplingParams(stop=["<end>"]), finish=("length", None))
    assert outputs[-1].text == "<en" and joined(outputs) == "a <en"
    assert (outputs[-1].finish_reason, outputs[-1].stop_upstream) == ("length", False)


def test_the_engine_cores_finish_reasons_pass_through(tokenizer):
    eos = run(tokenizer, "hi.", SamplingParams(), finish=("stop", None))[-1]
    stop_id = run(tokenizer, "hi.", SamplingParams(), finish=("stop", 14))[-1]
    assert (eos.finish_reason, eos.stop_reason) == ("stop", None)
    assert (stop_id.finish_reason, stop_id.stop_reason) == ("stop", 14)


def test_a_stop_string_on_the_last_token_is_the_reason_but_needs_no_stopping(tokenizer):
    last = run(tokenizer, "one STOP", SamplingParams(stop=["STOP"]), finish=("length", None))[-1]
    assert (last.finish_reason, last.stop_reason, last.stop_upstream) == ("stop", "STOP", False)


def test_without_a_tokenizer_token_ids_only():
    state = OutputProcessor(None).new_completion([1, 2], SamplingParams(stop=["x"]))
    assert state.add_token(5) == TokenOutput(5, "", None, None)
    assert state.add_token(6, "stop", 6) == TokenOutput(6, "", "stop", 6)
    assert state.released == 0


def test_restored_from_a_checkpoint_it_goes_on_as_if_uninterrupted(tokenizer):
    params = SamplingParams(stop=["<end>"])
    ids = tokenizer.encode("a 日 <en <end> b")
    expected = [o.text for o in run(tokenizer, "a 日 <en <end> b", params)]
    processor = OutputProcessor(tokenizer)
    for cut in range(len(expected)):                      # every point, held-back bytes and stop prefixes too
        first = processor.new_completion(tokenizer.encode("Q: "), params)
        texts = [first.add_token(t).text for t in ids[:cut]]
        resumed = processor.new_completion(tokenizer.encode("Q: "), params)
        resumed.restore(ids[:cut], first.released)
        texts += [resumed.add_token(t).text for t in ids[cut:len(expected)]]
        assert texts == expected, cut


# ---- one path for every entrypoint -----------------------------------------------------------------------------
def test_the_engine_uses_the_output_processor(tmp_path):
    from transformers import LlamaConfig

    from conftest import TINY
    from engine import LLM

    LlamaConfig(**TINY).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), load_format="dummy", tokenizer="smollm2-135m-instruct", progress=False)
    assert type(llm.engine.output_processor) is OutputProcessor
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = llm.generate("Hello", params)[0]
    state = OutputProcessor(llm.tokenizer).new_completion(out.prompt_token_ids, params)
    ids = out.outputs[0].token_ids
    again = [state.add_token(t, "length" if i == len(ids) - 1 else None) for i, t in enumerate(ids)]
    assert out.outputs[0].text == joined(again) and out.outputs[0].finish_reason == "length"
    assert len(out.metrics.token_times) == len(ids) == 12               # one host arrival time per token
    assert out.metrics.token_times == sorted(out.metrics.token_times)
    assert out.metrics.token_times[0] == out.metrics.first_token_time


def test_the_detokenizer_service_uses_it_and_resumes_from_its_checkpoint(tokenizer, redis_url):
    """Replica A handles a completion's first tokens; replica B, which never saw it, takes over from the
    checkpoints: the gateway gets exactly the text of an uninterrupted completion, each piece once."""
    from services.detokenizer import DetokenizerService
    from services.transport import Transport

    transport = Transport(redis_url, prefix=f"detok-{uuid.uuid4().hex[:6]}")
    params = SamplingParams(stop=["<end>"], max_tokens=100)
    text = "日本 <en <end> never sent"
    prompt, ids = tokenizer.encode("Q: "), tokenizer.encode(text)
    meta = RequestMeta("r", "gw", len(prompt), prompt, params)
    transport.redis.set(transport.names.request_meta("r"), encode(meta))
    expected = run(tokenizer, text, params)

    def handle(service: DetokenizerService, position: int):
        msg = StepTokens(step=position, request_ids=["r"], indexes=[0], positions=[position],
                         token_ids=[ids[position]], finish_reasons=[None], stop_reasons=[None], num_cached_tokens=[0])
        with transport.redis.pipeline(transaction=True) as pipe:
            pipe.watch(transport.names.request_meta("r"))
            completion = service._completion("r", 0, pipe)
            pipe.multi()
            checkpoints = {}
            item = service._advance(completion, msg, 0, pipe, checkpoints)
            service._save(checkpoints, pipe)
            pipe.execute()
        return item

    a, b = (DetokenizerService(transport, OutputProcessor(tokenizer), partitions=1) for _ in range(2))
    assert type(a.output_processor) is OutputProcessor
    items = [handle(a, p) for p in range(4)]                 # "日" whole, "本" in the middle of its bytes
    items += [handle(b, p) for p in range(4, len(expected))]
    assert [i.text for i in items] == [o.text for o in expected] and [i.seq for i in items] == list(range(len(items)))
    assert (items[-1].finish_reason, items[-1].stop_reason) == ("stop", "<end>")
    assert "".join(i.text for i in items) == "日本 <en "
    assert transport.redis.xlen(transport.names.abort) == 1              # the stop string stops it upstream


# ---- deferred text ---------------------------------------------------------------------------------------------
def test_deferred_text_is_decoded_when_asked_for_and_is_the_same(tokenizer):
    """defer_text: tokens wait undecoded until pending_text() or the finishing token, which bring the text the
    eager path gave, whole characters only, however the asking falls between a character's bytes."""
    params = SamplingParams()
    ids = tokenizer.encode(TEXT)
    expected = run(tokenizer, TEXT, params)
    for every in (1, 2, 3, 5, len(ids)):
        state = OutputProcessor(tokenizer).new_completion(tokenizer.encode("Q: "), params, defer_text=True)
        texts = []
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            out = state.add_token(token, "length" if last else None)
            assert out.token_id == token and out.finish_reason == ("length" if last else None)
            if not last:
                assert out.text == ""                          # nothing decoded until asked
                if (i + 1) % every == 0:
                    texts.append(state.pending_text())
            else:
                texts.append(out.text)
        assert "".join(texts) == joined(expected) == TEXT, every
        assert all("\ufffd" not in t for t in texts)
        assert state.pending_text() == ""


def test_a_completion_with_stop_strings_is_never_deferred(tokenizer):
    """Its text can end it, so every token is decoded as it comes, and the stop is found on its token."""
    params = SamplingParams(stop=["STOP"])
    state = OutputProcessor(tokenizer).new_completion(tokenizer.encode("Q: "), params, defer_text=True)
    outputs = [state.add_token(t) for t in tokenizer.encode("one STOP")]
    assert joined(outputs) == "one " and outputs[-1].stop_upstream and outputs[-1].stop_reason == "STOP"
    assert state.pending_text() == ""


def test_the_offline_engine_streamed_or_not_gives_the_eager_text(tmp_path):
    """LLMEngine defers its completions' text: an offline batch decodes each completion once, a stream every
    step. Both give what the output processor gives token by token."""
    from transformers import LlamaConfig

    from conftest import TINY
    from engine import LLM

    LlamaConfig(**TINY).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), load_format="dummy", tokenizer="smollm2-135m-instruct", progress=False)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    batch = llm.generate(["Hello", "日本"], params)
    engine = llm.engine
    engine.add_request("s", "日本", params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [out.outputs[0].delta_text for out in engine.step(stream=True)]
    streamed = "".join(deltas)
    for out in batch:
        state = OutputProcessor(llm.tokenizer).new_completion(out.prompt_token_ids, params)
        ids = out.outputs[0].token_ids
        assert out.outputs[0].text == joined([state.add_token(t, "length" if i == len(ids) - 1 else None)
                                              for i, t in enumerate(ids)])
    assert streamed == batch[1].outputs[0].text
    assert sum(bool(d) for d in deltas) > len(deltas) // 2            # the text came as it was generated
