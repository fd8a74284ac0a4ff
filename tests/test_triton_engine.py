"""The Triton path (kernels, multi-step decoding with advance_step, CUDA graphs on the GPU) gives the reference
path's greedy tokens. On the GPU at realistic sizes; without one, the same code under Triton's interpreter on a
tiny model (what CI runs)."""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from engine import LLM, SamplingParams

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Random weights with well-separated logits: GQA 4, head_dim 64 on the GPU (128 would be slower to build)."""
    import transformers
    shape = (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048) if GPU else
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=512, max_position_embeddings=512))
    config = transformers.LlamaConfig(**shape, initializer_range=0.08 if GPU else 0.3, rms_norm_eps=1e-5,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("triton-model")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def generate(path, backend: str, prompts, **options):
    llm = LLM(str(path), progress=False, device=DEVICE, dtype="float32", kernel_backend=backend, **options)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    return llm.generate(prompts, params)


def test_triton_path_gives_the_reference_tokens(model_dir):
    vocab = 8192 if GPU else 512
    prompts = random_prompts(64, 5, 700, vocab=vocab, seed=7) if GPU else random_prompts(5, 3, 40, vocab=vocab, seed=7)
    reference = generate(model_dir, "torch", prompts, cuda_graphs=False, num_scheduler_steps=1)
    triton = generate(model_dir, "triton", prompts, num_scheduler_steps=4, max_num_batched_tokens=2048)
    for ref, out in zip(reference, triton):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        # fp32 logprobs agree too, not just their argmax
        for a, b in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in b.top] == pytest.approx([v for _, v in a.top], abs=2e-3)
