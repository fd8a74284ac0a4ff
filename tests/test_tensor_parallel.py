"""Tensor parallelism (engine/tensor_parallel.py): two processes splitting the model over gloo give the greedy
tokens of one, for every architecture, with chunked prefill, preemption and forks forced."""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)


def _generate(path, prompts, params=GREEDY, **options):
    with LLM(str(path), progress=False, **options) as llm:
        outputs = llm.generate(prompts, params)
        return outputs, llm.engine.scheduler.num_preemptions


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_two_ranks_give_the_tokens_of_one(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = random_prompts(6, 5, 80, seed=11)
    # 16 blocks of 8 slots cannot hold the 6 sequences: preemption; 32 tokens a step: chunked prefill
    options = dict(num_blocks=16, block_size=8, max_num_batched_tokens=32, num_scheduler_steps=4)
    single, _ = _generate(path, prompts, **options)
    split, preemptions = _generate(path, prompts, tensor_parallel_size=2, **options)
    assert preemptions > 0
    for one, two in zip(single, split):
        assert two.outputs[0].token_ids == one.outputs[0].token_ids
        for a, b in zip(one.outputs[0].logprobs, two.outputs[0].logprobs):
            assert [t for t, _ in b.top] == [t for t, _ in a.top]
            assert [v for _, v in b.top] == pytest.approx([v for _, v in a.top], abs=1e-4)


def test_forks_copy_their_blocks_on_every_rank(tiny_model_dir):
    """n=3 greedy forks share the prompt's blocks and copy the partial one on their first write: on each rank."""
    path = tiny_model_dir("llama")
    prompts = random_prompts(3, 20, 40, seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=3)
    single, _ = _generate(path, prompts, params, num_blocks=64)
    split, _ = _generate(path, prompts, params, num_blocks=64, tensor_parallel_size=2)
    for one, two in zip(single, split):
        assert [c.token_ids for c in two.outputs] == [c.token_ids for c in one.outputs]
        assert len({tuple(c.token_ids) for c in two.outputs}) == 1


def test_a_model_the_ranks_cannot_split_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide the model's attention heads"):
        LLM(str(tiny_model_dir("llama")), progress=False, tensor_parallel_size=3)
    assert not torch.distributed.is_initialized()          # refused before any process started


def test_served_with_two_ranks(tmp_path_factory):
    """pagestream serve --tensor-parallel-size 2: the worker (rank 0) talks to Redis while its follower computes
    beside it, and the served greedy text is the single-rank offline text."""
    import openai
    import transformers

    from conftest import TINY, start_stack, stop_stack
    path = tmp_path_factory.mktemp("tiny-llama-smollm2-vocab")
    torch.manual_seed(3)
    # SmolLM2's tokenizer's vocabulary, so text goes in and out
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "vocab_size": 49152, "max_position_embeddings": 2048})).save_pretrained(path)
    prompts = ["The capital of France is", "Count with me: 1, 2, 3,"]
    with LLM(str(path), progress=False, tokenizer="smollm2-135m-instruct", max_model_len=2048) as llm:
        expected = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12,
                                                                                     ignore_eos=True))]
    stack = start_stack(tmp_path_factory.mktemp("tp-stack"), "--model", str(path), "--tokenizer",
                        "smollm2-135m-instruct", "--tensor-parallel-size", "2", grpc=False)
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0)
        model = client.models.list().data[0].id
        served = [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=model, prompt=prompts[0], max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if chunk.choices)
    finally:
        stop_stack(stack)
    assert served == expected
    assert streamed == expected[0]
