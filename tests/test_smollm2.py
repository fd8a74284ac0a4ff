"""The default model, real weights (SmolLM2-135M-Instruct from its GGUF): greedy tokens equal transformers', and the
user-facing paths (chat template, stop strings, logprobs, n > 1, the CLI) behave."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import hf_greedy
from engine import LLM, SamplingParams
from engine.model_files import resolve_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4, 5, 6, 7,",
    "Translate to French: I like apples. ->",
    "Q: Why is the sky blue?\nA:",
    "Here is a list of the planets of the solar system, in order from the sun: Mercury, Venus, Earth, Mars, Jupiter,"
    " Saturn, Uranus and Neptune. The largest of them is",
    "Hi",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(progress=False)


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("smollm2-135m-instruct", progress=False).path


def test_greedy_equals_transformers_token_for_token(llm, model_dir):
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(PROMPTS)                # all different lengths
    outputs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(model_dir, prompt_ids, 40)


def test_chat_answers_through_the_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0]
    assert "<|im_start|>" in llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None   # ended by EOS


def test_text_is_the_decode_of_the_tokens(llm):
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0.8, seed=3, max_tokens=48))
    for o in outs:
        c = o.outputs[0]
        assert c.text == llm.tokenizer.decode(c.token_ids) and c.text


def test_stop_string_cuts_the_text_and_finishes(llm):
    free = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0].outputs[0]
    stop = free.text.strip().split()[3]                     # a word the model will produce
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=48, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]


def test_logprobs_are_the_models(llm, model_dir):
    from transformers import AutoModelForCausalLM
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    top = ref.topk(3)
    lp = out.logprobs[0]
    assert [t for t, _ in lp.top] == top.indices.tolist() and out.token_ids[0] == lp.top[0][0]
    assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert lp.logprob == pytest.approx(top.values[0].item(), abs=1e-4)


def test_n_completions_and_seeds(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=24, ignore_eos=True)
    first = llm.generate([PROMPTS[2]], params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    texts = [c.text for c in first.outputs]
    assert len(set(texts)) == 3
    assert [c.text for c in llm.generate([PROMPTS[2]], params)[0].outputs] == texts


def test_cli_generate_answers():
    result = subprocess.run([sys.executable, "-m", "services.cli", "generate", "What is the capital of France?",
                             "--max-tokens", "32"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
