"""Structured output in the engine: the sampler's bitmask stage against a plain masked reference, the grammar
cache, the matcher's bitmask against a reference written from the tokenizer's strings, and the offline LLM
path (k=1 and k=8, mixed batches, preemption, plans cut short), every completion parsed and validated."""
from __future__ import annotations

import json
import logging
import math
import random

import jsonschema
import pytest
import torch

from engine.sampler import Sampler, SamplingBatch, SamplingRow, TokenBitmask, apply_token_bitmask
from schemas.sampling_params import SamplingParams
from schemas.structured_outputs import StructuredOutputsParams

EOS = 2
sampler = Sampler()


# ---- the sampler's stage ----------------------------------------------------------------------------------------
def packed(allowed: set[int], vocab_size: int) -> list[int]:
    """The reference packing: bit v % 32 of word v // 32, as int32 (two's complement)."""
    words = [0] * -(-vocab_size // 32)
    for v in allowed:
        words[v // 32] |= 1 << (v % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def mask_of(allowed: dict[int, set[int]], vocab_size: int) -> TokenBitmask:
    rows = sorted(allowed)
    return TokenBitmask(torch.tensor(rows, dtype=torch.int64),
                        torch.tensor([packed(allowed[r], vocab_size) for r in rows], dtype=torch.int32))


def random_allowed(rng: random.Random, vocab_size: int) -> set[int]:
    # Always some of the word-boundary tokens (31: the sign bit; the last id, in a partial word).
    chosen = set(rng.sample(range(vocab_size), rng.randint(1, vocab_size // 3)))
    return chosen | {t for t in (31, 32, 63, vocab_size - 1) if rng.random() < 0.5}


@pytest.mark.parametrize("vocab_size", [77, 96, 33])
def test_bitmask_stage_matches_a_masked_reference(vocab_size):
    rng = random.Random(vocab_size)
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(vocab_size))
    allowed = {b: random_allowed(rng, vocab_size) for b in (0, 2, 3, 5)}
    out = apply_token_bitmask(logits, mask_of(allowed, vocab_size))
    for b in range(6):
        expected = [x if b not in allowed or v in allowed[b] else -math.inf for v, x in enumerate(logits[b].tolist())]
        assert out[b].tolist() == expected


def batch(rows: list[SamplingRow], vocab_size: int, allowed: dict[int, set[int]] | None) -> SamplingBatch:
    b = SamplingBatch.from_rows(rows, vocab_size, {EOS}, "cpu")
    b.token_bitmask = None if allowed is None else mask_of(allowed, vocab_size)
    return b


def test_constrained_rows_sample_only_allowed_tokens_and_free_rows_are_unchanged():
    vocab_size, rng = 70, random.Random(0)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0, seed=5, logprobs=3),
              SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=1, logprobs=3),
              SamplingParams(temperature=1.0, seed=2, logprobs=3)]
    for trial in range(40):
        rows = [SamplingRow(p, trial * 10 + i, [1, 2] + [3] * (trial % 5), 2) for i, p in enumerate(params)]
        logits = torch.randn(len(rows), vocab_size, generator=torch.Generator().manual_seed(trial)) * 3
        allowed = {0: random_allowed(rng, vocab_size), 1: random_allowed(rng, vocab_size),
                   2: random_allowed(rng, vocab_size)}                      # row 3 is free
        free = sampler(logits, batch(rows, vocab_size, None))
        out = sampler(logits, batch(rows, vocab_size, allowed))
        tokens = out.token_ids.tolist()
        for b, ok in allowed.items():
            assert tokens[b] in ok
        # greedy: the best allowed token
        assert tokens[0] == max(allowed[0], key=lambda v: logits[0, v].item())
        assert tokens[3] == free.token_ids[3].item()                          # same seed, same step, no mask
        # logprobs: the model's, over the allowed tokens only (vLLM: the grammar masks the logits themselves)
        for b, ok in allowed.items():
            row = logits[b].tolist()
            norm = math.log(sum(math.exp(row[v]) for v in ok))
            assert out.logprobs[b].item() == pytest.approx(row[tokens[b]] - norm, abs=1e-4)
            assert set(out.top_token_ids[b].tolist()) <= ok | {
                v for v, lp in zip(out.top_token_ids[b].tolist(), out.top_logprobs[b].tolist()) if lp == -math.inf}
        assert out.logprobs[3].item() == pytest.approx(free.logprobs[3].item())


def test_a_single_allowed_token_is_always_sampled():
    vocab_size = 50
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=s), s, [1], 1) for s in range(8)]
    logits = torch.randn(8, vocab_size, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = -30.0                                                    # unlikely, but the only one allowed
    out = sampler(logits, batch(rows, vocab_size, {b: {7} for b in range(8)}))
    assert out.token_ids.tolist() == [7] * 8


# ---- the StructuredOutputsParams wire type -------------------------------------------------------------------
def test_structured_outputs_params_take_exactly_one_constraint():
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    assert spec.kind == "json" and spec.json == '{"type":"object","properties":{"b":{},"a":{}}}'   # order kept
    assert spec.key() == StructuredOutputsParams(json=spec.json).key()
    assert spec.key() != StructuredOutputsParams(json=spec.json, disable_any_whitespace=True).key()
    assert StructuredOutputsParams(choice=("a", "b")).key() == ("choice", ("a", "b"), False)
    for bad in [{}, {"regex": "a", "choice": ["a"]}, {"json": "{no"}, {"json": "[1]"}, {"choice": []},
                {"choice": ["a", ""]}, {"json_object": True, "grammar": "root ::= \"a\""}]:
        with pytest.raises(ValueError):
            StructuredOutputsParams(**bad)


def test_structured_outputs_travel_in_sampling_params():
    from schemas.codec import SchemaError, decode, encode
    from schemas.messages import GenerateRequest
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    request = GenerateRequest("r", "g", params, 1.0, prompt="x")
    assert decode(GenerateRequest, encode(request)).params == params
    import msgpack
    body = msgpack.unpackb(encode(request))
    body["params"]["structured_outputs"] = {"regex": "a", "choice": ["a"]}
    with pytest.raises(SchemaError, match="exactly one constraint"):
        decode(GenerateRequest, msgpack.packb(body))


# ---- the API's ways in -------------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("fields, expected", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "a+", "disable_fallback": True}}, StructuredOutputsParams(regex="a+")),
    ({"structured_outputs": {"json": json.dumps(SCHEMA), "disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"structured_outputs": {"choice": ["x", "y"]}}, StructuredOutputsParams(choice=["x", "y"])),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutputsParams(grammar='root ::= "a"')),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "b+"}, StructuredOutputsParams(regex="b+")),
    ({"guided_choice": ["p", "q"]}, StructuredOutputsParams(choice=["p", "q"])),
    ({"guided_grammar": 'root ::= "b"', "guided_decoding_backend": "xgrammar"},
     StructuredOutputsParams(grammar='root ::= "b"')),
])
def test_every_way_in_gives_the_same_spec(fields, expected):
    from services.openai_protocol import Limits, parse_chat, parse_completion
    limits = Limits("m")
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}], **fields}, limits)
    completion = parse_completion({"prompt": "hi", **fields}, limits)
    assert chat.params.structured_outputs == expected == completion.params.structured_outputs


# ---- grammars and matchers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grammars(default_tokenizer):
    from engine.structured_output import Grammars
    from engine.tokenizer import Tokenizer
    return Grammars(Tokenizer(default_tokenizer.name_or_path), 49152, {EOS}, max_cached=2)


def test_grammars_compile_once_per_spec_in_an_lru(grammars):
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+"))
    before = grammars.num_compiled
    first = grammars.compile(a)
    assert grammars.compile(StructuredOutputsParams(regex="a+")) is first and grammars.num_compiled == before + 1
    grammars.compile(b)
    grammars.compile(a)                        # a is now the most recent: c evicts b
    grammars.compile(c)
    assert grammars.num_compiled == before + 3
    assert grammars.compile(a) is first
    grammars.compile(b)
    assert grammars.num_compiled == before + 4


@pytest.mark.parametrize("spec, message", [
    (dict(json={"type": "strin"}), 'Unsupported type "strin"'),
    (dict(regex="(ab"), "parenthesis is not closed"),
    (dict(grammar="root ::= foo"), 'Rule "foo" is not defined'),
])
def test_a_spec_that_cannot_compile_says_why(grammars, spec, message):
    with pytest.raises(ValueError, match=message) as e:
        grammars.compile(StructuredOutputsParams(**spec))
    assert "/project/" not in str(e.value)                # xgrammar's message, without its C++ source location


def test_without_a_tokenizer_nothing_compiles():
    from engine.structured_output import Grammars
    with pytest.raises(ValueError, match="tokenizer"):
        Grammars(None, 100, {EOS}).compile(StructuredOutputsParams(regex="a"))


def allowed_tokens(mask: TokenBitmask, row: int, vocab_size: int) -> set[int]:
    words = mask.bitmask[row].tolist()
    return {v for v in range(vocab_size) if (words[v // 32] >> (v % 32)) & 1}


def test_the_matchers_bitmask_is_every_token_that_continues_a_choice(grammars, default_tokenizer):
    """Reference: a token is allowed where its text extends what was accepted towards one of the choices;
    EOS once a choice is complete; only EOS once the grammar ended."""
    from engine.structured_output import accept_batch, token_bitmask
    vocab_size = len(default_tokenizer)
    choices = ["yes", "no", "not sure"]
    spec = StructuredOutputsParams(choice=choices)
    texts = {v: default_tokenizer.decode([v]) for v in range(vocab_size)}
    special = set(default_tokenizer.all_special_ids)

    def reference(prefix: str) -> set[int]:
        ok = {v for v, t in texts.items() if t and v not in special and any(
            c.startswith(prefix + t) for c in choices)}
        return ok | ({EOS} if prefix in choices else set())

    states = [grammars.state(spec) for _ in range(3)]
    mask = token_bitmask(states, [0, 1, 2], vocab_size, {EOS}, torch.device("cpu"))
    assert mask.rows.tolist() == [0, 1, 2]
    assert allowed_tokens(mask, 0, vocab_size) == reference("") == allowed_tokens(mask, 2, vocab_size)
    no = default_tokenizer.encode("no", add_special_tokens=False)
    assert len(no) == 1
    accept_batch(states[:2], [no[0], no[0]])
    states[2].accept(default_tokenizer.encode("not", add_special_tokens=False))
    mask = token_bitmask(states, [4, 5, 6], vocab_size, {EOS}, torch.device("cpu"))
    assert allowed_tokens(mask, 0, vocab_size) == reference("no")
    assert allowed_tokens(mask, 2, vocab_size) == reference("not")
    states[0].accept([EOS])                                  # the grammar ends: only EOS from now on
    assert states[0].done and states[0].num_seen == 2
    states[0].accept([EOS])
    mask = token_bitmask(states[:1], [0], vocab_size, {EOS}, torch.device("cpu"))
    assert allowed_tokens(mask, 0, vocab_size) == {EOS}


# ---- the offline engine ----------------------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"]}
CODE = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                         "ok": {"type": "boolean"}}, "required": ["code", "ok"]}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


SMALL = dict(max_model_len=1024, kv_cache_memory_gb=0.25, max_num_seqs=32)     # the machine is shared


@pytest.fixture(scope="module", params=[1, 8], ids=["k=1", "k=8"])
def llm(request):
    from engine.llm import LLM
    engine = LLM(progress=False, num_scheduler_steps=request.param, **SMALL)
    yield engine
    del engine
    import gc
    gc.collect()


def constrained(n: int = 1, seed: int = 0, max_tokens: int = 120, **spec) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def assert_valid_json(completion, schema: dict) -> None:
    assert completion.finish_reason == "stop", (completion.text, "cut by max_tokens")
    jsonschema.validate(json.loads(completion.text), schema)


def test_offline_completions_follow_their_schemas_regex_and_choice(llm, caplog):
    caplog.set_level(logging.WARNING, "pagestream.structured_output")
    outputs = llm.generate([ASK, ASK, "The code is", "Is the sky blue? Answer:"],
                           [constrained(n=4, json=PERSON), constrained(n=4, json=CODE, disable_any_whitespace=True),
                            constrained(n=4, regex=r"[A-Z]{2}[0-9]{3}"), constrained(n=4, choice=["yes", "no"])])
    for completion in outputs[0].outputs:
        assert_valid_json(completion, PERSON)
    for completion in outputs[1].outputs:
        assert_valid_json(completion, CODE)
        assert "\n" not in completion.text
    import re
    assert all(re.fullmatch(r"[A-Z]{2}[0-9]{3}", c.text) and c.finish_reason == "stop" for c in outputs[2].outputs)
    assert all(c.text in ("yes", "no") and c.finish_reason == "stop" for c in outputs[3].outputs)
    assert not caplog.records                     # no matcher was ever offered a token it could not take


def test_offline_free_rows_give_their_greedy_text_beside_constrained_ones(llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    mixed = llm.generate([ASK, prompts[0], ASK, prompts[1], prompts[2]],
                         [constrained(json=PERSON, seed=1), greedy, constrained(choice=["a", "b"]), greedy, greedy])
    assert [mixed[i].outputs[0].token_ids for i in (1, 3, 4)] == alone
    assert_valid_json(mixed[0].outputs[0], PERSON)
    assert mixed[2].outputs[0].text in ("a", "b")


def test_preempted_and_cut_sequences_keep_their_matchers_in_step(caplog):
    """A KV pool too small for all at once: sequences are preempted and recomputed; and every other plan is cut
    after its first step (as the worker does when a prompt arrives). Each matcher must have accepted exactly
    the tokens its sequence kept, or a completion breaks its schema (or a matcher refuses a token: logged)."""
    from engine.llm import LLM
    caplog.set_level(logging.WARNING, "pagestream.structured_output")
    llm = LLM(progress=False, num_scheduler_steps=8, num_blocks=16, block_size=16, max_model_len=1024)
    engine = llm.engine
    for i in range(6):
        engine.add_request(f"r{i}", ASK, constrained(seed=i, json=PERSON, max_tokens=100))
    calls = iter(range(10**6))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step(stream=False, should_stop=lambda: next(calls) % 2 == 1):
            done[out.request_id] = out
    assert engine.scheduler.num_preemptions > 0
    assert len(done) == 6
    for out in done.values():
        assert_valid_json(out.outputs[0], PERSON)
    assert not caplog.records


def test_json_rows_never_sample_control_characters_and_rows_keep_their_places(grammars, default_tokenizer):
    """xgrammar 0.2.9 allows a tab or \\x01 inside a length-bounded JSON string, which JSON forbids: JSON-schema
    rows are and-ed with a row without them. Rows of other constraints keep xgrammar's mask as it is."""
    from engine.structured_output import GrammarState, token_bitmask
    vocab_size = 49152
    schema = StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "string", "maxLength": 9}},
                                           "required": ["n"]})
    prefix = default_tokenizer.encode('{"n": "a', add_special_tokens=False)
    json_state, raw_state = grammars.state(schema), GrammarState(grammars.future(schema))
    regex_state = grammars.state(StructuredOutputsParams(regex="a[\t ]b"))
    for state in (json_state, raw_state):
        state.accept(prefix)
    regex_state.accept(default_tokenizer.encode("a", add_special_tokens=False))
    mask = token_bitmask([json_state, regex_state, raw_state], [7, 3, 5], vocab_size, {EOS}, torch.device("cpu"))
    assert mask.rows.tolist() == [7, 3, 5]
    tab = default_tokenizer.convert_tokens_to_ids("ĉ")                       # byte-level BPE's "\t"
    assert default_tokenizer.decode([tab]) == "\t"
    assert tab in allowed_tokens(mask, 2, vocab_size)                       # xgrammar alone would allow it
    assert tab in allowed_tokens(mask, 1, vocab_size)                       # and a regex asking for it gets it
    safe = allowed_tokens(mask, 0, vocab_size)
    assert safe == {v for v in allowed_tokens(mask, 2, vocab_size)
                    if not any(c < " " and c != "\n" for c in default_tokenizer.decode([v]))}
