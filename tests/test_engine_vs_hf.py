"""The engine's greedy tokens equal Hugging Face transformers' greedy generate, token for token: for every
supported architecture, and under every scheduling path (preemption, prefix caching, chunked prefill, batching,
forking)."""
from __future__ import annotations

import pytest

from conftest import ARCHITECTURES, hf_greedy, random_prompts
from engine import LLM, SamplingParams

NEW_TOKENS = 32


def greedy(max_tokens: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llama_reference(tiny_model_dir):
    """8 prompts of different lengths (5..150 tokens) and transformers' greedy continuations."""
    path = tiny_model_dir("llama")
    prompts = random_prompts(8, 5, 150, seed=1)
    return path, prompts, hf_greedy(path, prompts, NEW_TOKENS)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_match_transformers(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = random_prompts(8, 3, 120, seed=2)
    llm = LLM(str(path), progress=False)
    assert tokens(llm.generate(prompts, greedy())) == hf_greedy(path, prompts, NEW_TOKENS)


def test_preemption_keeps_greedy_outputs(llama_reference):
    path, prompts, expected = llama_reference
    # 24 blocks of 16 slots cannot hold 8 sequences of up to 182 tokens: the scheduler must preempt.
    llm = LLM(str(path), progress=False, num_blocks=24, block_size=16)
    assert tokens(llm.generate(prompts, greedy())) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_caching_keeps_greedy_outputs(tiny_model_dir):
    path = tiny_model_dir("llama")
    shared = random_prompts(1, 70, 70, seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(6, 1, 40, seed=4)]
    expected = hf_greedy(path, prompts, NEW_TOKENS)
    llm = LLM(str(path), progress=False, block_size=8)
    assert tokens(llm.generate(prompts[:1], greedy())) == expected[:1]      # fills the cache
    outputs = llm.generate(prompts[1:], greedy())
    assert tokens(outputs) == expected[1:]
    assert all(o.num_cached_tokens >= 64 for o in outputs)                  # 8 full blocks of the shared prefix
    assert llm.engine.stats().kv.prefix_hit_rate > 0.3


def test_chunked_prefill_keeps_greedy_outputs(llama_reference):
    path, prompts, expected = llama_reference
    llm = LLM(str(path), progress=False, max_num_batched_tokens=16)
    assert tokens(llm.generate(prompts, greedy())) == expected


def test_batch_of_one_equals_batch_of_32(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    prompts = random_prompts(32, 2, 60, seed=5)
    llm = LLM(str(path), progress=False)
    batched = tokens(llm.generate(prompts, greedy(16)))
    alone = [tokens(llm.generate([p], greedy(16)))[0] for p in prompts]
    assert batched == alone
    assert batched[:4] == hf_greedy(path, prompts[:4], 16)


def test_forked_sequences_share_the_prompt_and_continue_correctly(llama_reference):
    """n=3 greedy: every fork must reproduce the single greedy continuation, which checks that children share
    the prompt's blocks and copy the partial one before writing (block size 16, prompts not multiples of 16)."""
    path, prompts, expected = llama_reference
    llm = LLM(str(path), progress=False)
    outputs = llm.generate(prompts[:4], greedy(n=3))
    for out, ref in zip(outputs, expected):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == ref for c in out.outputs)
    assert llm.engine.stats().kv.num_used_blocks == 0                       # every fork released its blocks


def test_seeded_forks_differ_and_reproduce(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompt = random_prompts(1, 20, 20, seed=6)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    first = LLM(str(path), progress=False).generate([prompt], params)[0]
    again = LLM(str(path), progress=False).generate([prompt], params)[0]
    runs = [c.token_ids for c in first.outputs]
    assert runs == [c.token_ids for c in again.outputs]
    assert len({tuple(r) for r in runs}) == 3
