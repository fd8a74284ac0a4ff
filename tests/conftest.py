"""Shared fixtures: tiny random models of each supported architecture, saved with transformers, and Hugging Face
greedy references to compare the engine against."""
from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is ever fetched from a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
            # Larger than HF's default 0.02, so logits are well separated: a greedy comparison then tests the
            # model, not float rounding at near-ties.
            initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 256})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> a directory holding a random model of that architecture, saved by transformers."""
    import transformers
    made = {}

    def make(arch: str):
        if arch not in made:
            config_cls, model_cls, extra = ARCHITECTURES[arch]
            config = getattr(transformers, config_cls)(**TINY, **extra)
            torch.manual_seed(len(made) + 1)
            model = getattr(transformers, model_cls)(config)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def random_prompts(n: int, low: int, high: int, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32) -> list[list[int]]:
    """Hugging Face's greedy generate, one prompt at a time (no padding), EOS ignored."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs
