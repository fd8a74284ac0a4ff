"""The rest of the sampling surface, offline (LLM.generate) and served (`pagestream serve`, the official openai
client, vLLM's extensions through extra_body): logit_bias, allowed_token_ids, bad_words, prompt_logprobs, echo with
logprobs, include_stop_str_in_output, best_of, /tokenize and /detokenize. Prompt logprobs are checked against a
plain forward pass of the whole prompt with transformers."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_files import resolve_model

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
# Longer than one prefill chunk of the engine below (16 tokens a step), so prefilled over several steps.
LONG_PROMPT = ("Here is a list of the planets of the solar system, in order from the sun: Mercury, Venus, Earth, "
               "Mars, Jupiter, Saturn, Uranus and Neptune. The largest of them is")


@pytest.fixture(scope="module")
def llm():
    # At most 16 prompt tokens of a sequence per step: long prompts are prefilled in chunks.
    return LLM(MODEL, progress=False, max_model_len=512, long_prefill_token_threshold=16)


@pytest.fixture(scope="module")
def reference():
    """Prompt token ids -> [logprobs over the vocabulary at each position], from one plain forward pass."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL, progress=False).path,
                                                 dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)      # [P, V]
    return logprobs


def greedy(max_tokens: int = 8, **params) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **params)


def check_prompt_logprobs(ids: list[int], entries: list, k: int, reference) -> None:
    """entries (TokenLogprobs, aligned with ids, the first None) against the plain forward pass."""
    want = reference(ids)
    assert entries[0] is None and len(entries) == len(ids)
    for i, entry in enumerate(entries[1:], start=1):
        row = want[i - 1]                                    # position i-1 predicts token i
        assert entry.logprob == pytest.approx(row[ids[i]].item(), abs=2e-3)
        assert entry.rank == 1 + int((row > row[ids[i]] + 2e-3).sum()) or \
            abs(entry.rank - 1 - int((row > row[ids[i]]).sum())) <= 2      # near-ties may swap
        top = row.topk(k)
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert len(entry.top) == k


# ---- offline ----------------------------------------------------------------------------------------------------
def test_logit_bias_bans_and_forces_offline(llm):
    plain = llm.generate(PROMPT, greedy())[0].outputs[0].token_ids
    top = plain[0]
    banned = llm.generate(PROMPT, greedy(logit_bias={top: -100}))[0].outputs[0].token_ids
    assert top not in banned and banned != plain
    sampled = llm.generate(PROMPT, SamplingParams(max_tokens=8, seed=1, logit_bias={top: -100}))[0].outputs[0]
    assert top not in sampled.token_ids
    forced = llm.generate(PROMPT, SamplingParams(max_tokens=6, seed=2, logit_bias={1234: 100}))[0].outputs[0]
    assert forced.token_ids == [1234] * 6


def test_allowed_token_ids_restrict_offline(llm):
    allowed = [llm.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" red", " green", " blue", ".")]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, seed=3, temperature=1.5,
                                              allowed_token_ids=allowed))[0].outputs[0]
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1


def test_bad_words_never_appear_offline(llm):
    assert "Paris" in llm.generate(PROMPT, greedy())[0].outputs[0].text
    for words in (["Paris"], ["Paris", " the capital"]):
        params = greedy(12, bad_words=words)
        out = llm.generate(PROMPT, params)[0].outputs[0]
        for word in words:
            assert word.strip() not in out.text
        for sequence in params.bad_words_token_ids:              # nor as either of their tokenizations
            n = len(sequence)
            assert all(out.token_ids[i:i + n] != sequence for i in range(len(out.token_ids)))
    # a multi-token word: only its last token is banned, and only right after the rest of it
    assert "Paris." in llm.generate(PROMPT, greedy(12))[0].outputs[0].text
    two = greedy(12, bad_words=["Paris."])
    text = llm.generate(PROMPT, two)[0].outputs[0].text
    assert all(len(s) == 2 for s in two.bad_words_token_ids)
    assert "Paris" in text and "Paris." not in text


def test_prompt_logprobs_match_a_full_forward_pass(llm, reference):
    ids = llm.tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 32                                        # three chunks of 16 at least
    first = llm.generate(LONG_PROMPT, greedy(2, prompt_logprobs=3))[0]
    assert first.prompt_token_ids == ids and first.num_cached_tokens == 0
    check_prompt_logprobs(ids, first.prompt_logprobs, 3, reference)
    # The prefix cache now holds this prompt: a request for its logprobs computes it all the same.
    again = llm.generate(LONG_PROMPT, greedy(2))[0]
    assert again.num_cached_tokens > 0
    cached = llm.generate(LONG_PROMPT, SamplingParams(n=2, seed=4, max_tokens=2, prompt_logprobs=0))[0]
    assert cached.num_cached_tokens == 0
    check_prompt_logprobs(ids, cached.prompt_logprobs, 0, reference)
    short = llm.generate([ids[0]], greedy(1, prompt_logprobs=2))[0]
    assert short.prompt_logprobs == [None]
    assert llm.generate(PROMPT, greedy(1))[0].prompt_logprobs is None


def test_best_of_returns_the_highest_cumulative_logprob_offline(llm):
    params = dict(temperature=1.0, seed=11, max_tokens=6)
    every = llm.generate(PROMPT, SamplingParams(n=4, logprobs=0, **params))[0].outputs
    scores = [sum(lp.logprob for lp in c.logprobs) for c in every]
    assert [c.cumulative_logprob for c in every] == pytest.approx(scores)
    assert len({c.text for c in every}) > 1
    best = llm.generate(PROMPT, SamplingParams(n=2, best_of=4, **params))[0].outputs
    ranked = sorted(range(4), key=lambda i: scores[i], reverse=True)
    assert [c.text for c in best] == [every[i].text for i in ranked[:2]]
    assert [c.index for c in best] == [0, 1] and best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert best[0].logprobs is None                           # not asked for
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)


def test_include_stop_str_in_output_offline(llm):
    full = llm.generate(PROMPT, greedy(12))[0].outputs[0].text
    stop = full.split()[2]
    cut = full.index(stop)
    for include, want in ((False, full[:cut]), (True, full[:cut + len(stop)])):
        out = llm.generate(PROMPT, greedy(12, stop=[stop], include_stop_str_in_output=include))[0].outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (want, "stop", stop)


def test_invalid_token_ids_are_refused_offline(llm):
    vocab = llm.engine.vocab_size
    for params in (dict(logit_bias={vocab: 1.0}), dict(allowed_token_ids=[0, vocab + 5]),
                   dict(stop_token_ids=[vocab])):
        with pytest.raises(ValueError, match="vocabulary"):
            llm.generate(PROMPT, SamplingParams(**params))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


# ---- served -----------------------------------------------------------------------------------------------------
def completion(client, prompt=PROMPT, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, **{"max_tokens": 8, "temperature": 0, **kwargs})


def test_logit_bias_served(client, llm):
    plain = completion(client)
    top = llm.tokenizer.encode(PROMPT + plain.choices[0].text)[len(llm.tokenizer.encode(PROMPT))]
    token_text = llm.tokenizer.decode([top], skip_special_tokens=False)
    banned = completion(client, logit_bias={str(top): -100}, logprobs=0)
    assert token_text not in banned.choices[0].logprobs.tokens and banned.choices[0].text != plain.choices[0].text
    assert banned.choices[0].text == llm.generate(PROMPT, greedy(logit_bias={top: -100}))[0].outputs[0].text
    forced = completion(client, logit_bias={"1234": 100}, temperature=1.0, max_tokens=4, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [llm.tokenizer.decode([1234], skip_special_tokens=False)] * 4
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logit_bias={"1234": 100}, logprobs=True)
    assert [t.token for t in chat.choices[0].logprobs.content] == [forced.choices[0].logprobs.tokens[0]] * 4


def test_allowed_token_ids_and_bad_words_served(client, llm):
    allowed = [llm.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" red", " green", " blue", ".")]
    r = completion(client, temperature=1.5, seed=3, max_tokens=12, logprobs=0,
                   extra_body={"allowed_token_ids": allowed})
    assert set(r.choices[0].logprobs.tokens) <= {llm.tokenizer.decode([t]) for t in allowed}
    offline = llm.generate(PROMPT, SamplingParams(max_tokens=12, seed=3, temperature=1.5,
                                                  allowed_token_ids=allowed))[0].outputs[0].text
    assert r.choices[0].text == offline
    bad = completion(client, max_tokens=12, extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" not in bad and bad == llm.generate(PROMPT, greedy(12, bad_words=["Paris"]))[0].outputs[0].text


def test_bad_sampling_fields_served(client, llm):
    vocab = llm.engine.vocab_size
    beyond = rf"ids must be in \[0, {vocab}\), got \[{vocab}\]"
    for kwargs, message in ((dict(logit_bias={str(vocab): 1}), "logit_bias: " + beyond),
                            (dict(logit_bias={"5": 200}), "logit_bias"),
                            (dict(extra_body={"allowed_token_ids": [vocab]}), "allowed_token_ids: " + beyond),
                            (dict(extra_body={"allowed_token_ids": []}), "allowed_token_ids"),
                            (dict(n=2, best_of=1), "best_of"),
                            (dict(best_of=2, stream=True), "stream"),
                            (dict(extra_body={"prompt_logprobs": 1}, stream=True), "prompt_logprobs")):
        with pytest.raises(openai.BadRequestError, match=message) as e:
            completion(client, **kwargs)
        assert e.value.status_code == 400
    assert completion(client, max_tokens=2).choices[0].finish_reason == "length"        # still serving


def test_prompt_logprobs_and_echo_served(client, llm, reference):
    ids = llm.tokenizer.encode(LONG_PROMPT)
    want = reference(ids)
    r = completion(client, LONG_PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 2})
    shaped = r.choices[0].model_extra["prompt_logprobs"]
    assert shaped[0] is None and len(shaped) == len(ids)
    for i, entry in enumerate(shaped[1:], start=1):
        assert entry[str(ids[i])]["logprob"] == pytest.approx(want[i - 1, ids[i]].item(), abs=2e-3)
        assert entry[str(ids[i])]["decoded_token"] == llm.tokenizer.decode([ids[i]], skip_special_tokens=False)
        top = want[i - 1].topk(2)
        ranked = {t: v for t, v in entry.items() if v["rank"] <= 2}
        assert sorted(v["logprob"] for v in ranked.values()) == pytest.approx(sorted(top.values.tolist()), abs=2e-3)
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    chat_ids = llm.engine.input_processor.process(SamplingParams(), messages=messages)
    chat_want = reference(chat_ids)
    assert [None if e is None else e[str(t)]["logprob"] for e, t in zip(chat.model_extra["prompt_logprobs"],
                                                                         chat_ids)] == pytest.approx(
        [None] + [chat_want[i - 1, chat_ids[i]].item() for i in range(1, len(chat_ids))], abs=2e-3)
    # echo with logprobs: the echoed prompt's tokens carry their logprobs (the first none), then the completion's
    for stream in (False, True):
        kwargs = dict(echo=True, logprobs=1, max_tokens=3)
        if stream:
            chunks = list(completion(client, LONG_PROMPT, stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks)
            logprobs = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks if c.choices[0].logprobs), [])
                        for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        else:
            choices = completion(client, LONG_PROMPT, n=2, **kwargs).choices
            text, logprobs = choices[0].text, choices[0].logprobs.model_dump()
            echoed = {k: v[:len(ids)] for k, v in logprobs.items()}
            assert {k: v[:len(ids)] for k, v in choices[1].logprobs.model_dump().items()} == echoed   # each choice
        assert text.startswith(LONG_PROMPT)
        tokens = logprobs["tokens"]
        assert len(tokens) == len(ids) + 3
        assert tokens[:len(ids)] == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][1:len(ids)] == pytest.approx(
            [want[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=2e-3)
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"][1:])
        assert logprobs["text_offset"] == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        completed = llm.generate(LONG_PROMPT, greedy(3, logprobs=1))[0].outputs[0]
        assert logprobs["token_logprobs"][len(ids):] == pytest.approx([lp.logprob for lp in completed.logprobs],
                                                                      abs=2e-3)


def test_include_stop_str_in_output_served(client):
    full = completion(client, max_tokens=12).choices[0].text
    stop = full.split()[2]
    cut = full.index(stop)
    for include, want in ((False, full[:cut]), (True, full[:cut + len(stop)])):
        extra = {"include_stop_str_in_output": include}
        whole = completion(client, max_tokens=12, stop=[stop], extra_body=extra).choices[0]
        assert (whole.text, whole.finish_reason, whole.model_extra["stop_reason"]) == (want, "stop", stop)
        chunks = list(completion(client, max_tokens=12, stop=[stop], stream=True, extra_body=extra))
        assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_best_of_served_returns_the_highest_scoring(client):
    kwargs = dict(temperature=1.0, seed=21, max_tokens=6)
    every = completion(client, n=4, logprobs=0, **kwargs).choices
    scores = [sum(c.logprobs.token_logprobs) for c in every]
    assert len({c.text for c in every}) > 1
    best = completion(client, n=2, best_of=4, **kwargs)
    ranked = sorted(range(4), key=lambda i: scores[i], reverse=True)
    assert [c.text for c in best.choices] == [every[i].text for i in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    two_prompts = completion(client, [PROMPT, "Roses are red,"], n=1, best_of=3, **kwargs)
    assert [c.index for c in two_prompts.choices] == [0, 1]


def test_tokenize_equals_what_a_request_sees(client, serve_stack, llm):
    headers = {"Authorization": f"Bearer {serve_stack.api_key}"}
    base = serve_stack.base_url

    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=60)

    tokenized = post("/tokenize", {"prompt": LONG_PROMPT, "return_token_strs": True}).json()
    assert tokenized["tokens"] == llm.tokenizer.encode(LONG_PROMPT) and tokenized["max_model_len"] == 2048
    assert tokenized["count"] == completion(client, LONG_PROMPT, max_tokens=1).usage.prompt_tokens
    assert tokenized["token_strs"] == llm.tokenizer.hf.convert_ids_to_tokens(tokenized["tokens"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_tokens = post("/tokenize", {"messages": messages}).json()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat_tokens["count"] == chat.usage.prompt_tokens == len(llm.engine.input_processor.process(
        SamplingParams(), messages=messages))
    assert "token_strs" not in chat_tokens
    assert post("/detokenize", {"tokens": tokenized["tokens"]}).json() == {
        "prompt": llm.tokenizer.decode(tokenized["tokens"], skip_special_tokens=False)}
    refused = post("/detokenize", {"tokens": [llm.engine.vocab_size]})
    assert refused.status_code == 400 and "vocabulary" in refused.json()["error"]["message"]
    assert httpx.post(f"{base}/tokenize", json={"prompt": "x"}, timeout=60).status_code == 401
