"""Engine configuration: one dataclass per concern, gathered in EngineConfig.

`EngineConfig.from_kwargs(model=..., block_size=..., ...)` is what `LLM(model, **kwargs)` and the CLI call: every
field of every concern is a keyword, so users pass the flat options they know from vLLM.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"


def _option(default, help: str):
    """A config field that is also a command-line flag: its help text lives beside it (and `--help` shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    model: str = _option(DEFAULT_MODEL, "a model alias, a local Hugging Face directory, a .gguf file, or (with "
                                        "--load-format dummy) a known shape such as llama-3-8b")
    load_format: str = _option("auto", "auto: the model's weights; dummy: random weights of the model's shape")
    dtype: str = _option("auto", "auto: bf16 on a GPU (fp16 if the checkpoint says so), fp32 on the CPU")
    device: str = _option("auto", "auto: cuda when available, else cpu")
    max_model_len: int | None = _option(None, "longest sequence, prompt and output (default: the model's "
                                              "max_position_embeddings)")
    seed: int = _option(0, "seeds dummy weights and the draws of requests that bring no seed")
    tokenizer: str | None = _option(None, "a tokenizer directory or model alias (default: the model's; dummy "
                                          "weights take its vocabulary size); none: token ids only")
    kernel_backend: str = _option("auto", "auto: Triton kernels on a GPU, the PyTorch references on the CPU")
    cuda_graphs: bool = _option(True, "steps replay CUDA graphs: decode steps whole, prefill and mixed steps "
                                "between attentions (off: eager, like vLLM's enforce_eager)")
    async_output: bool = _option(True, "step n's tokens are handled on the host while step n+1 runs")
    tensor_parallel_size: int = _option(1, "processes (one per GPU) that split the model's heads, MLP and "
                                           "vocabulary (engine/tensor_parallel.py); on the CPU they talk gloo")


@dataclass
class CacheConfig:
    block_size: int = _option(16, "tokens per KV cache block (a power of two)")
    num_blocks: int | None = _option(None, "KV blocks in the pool (default: from the memory budget)")
    kv_cache_memory_gb: float | None = _option(None, "CPU: the KV pool's size in GiB (default 2, capped by "
                                                     "max_num_seqs x max_model_len)")
    gpu_memory_utilization: float = _option(0.9, "GPU: the fraction of device memory for weights, activations "
                                                 "and the KV pool")
    enable_prefix_caching: bool = _option(True, "reuse the KV blocks of prompt prefixes seen before")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _option(256, "sequences running at once")
    max_num_batched_tokens: int | None = _option(None, "token budget of one step, shared by prompt chunks and "
                                                       "decodes (default: 8192 on a GPU; 512 on the CPU, where "
                                                       "8192 prompt tokens take a minute)")
    long_prefill_token_threshold: int | None = _option(None, "the most prompt tokens one sequence computes in a "
                                                             "step, so that requests arriving during a long "
                                                             "prefill share its steps (default: the whole budget "
                                                             "on a GPU, half of it on the CPU)")
    enable_chunked_prefill: bool = _option(True, "split long prompts over steps (off: a prompt is prefilled in "
                                                 "one step or waits)")
    policy: str = _option("fcfs", "fcfs, or priority (lower value first, then arrival)")
    prefill_first: bool = _option(True, "in a burst (more prompt tokens waiting to start than one step takes), "
                                        "steps compute prompts first and the decodes take what they leave: the "
                                        "burst's last first token comes sooner, its first requests' second token "
                                        "later (SGLang's order; off: decodes first, as in vLLM)")
    num_scheduler_steps: int = _option(8, "decode steps per plan: the worker runs them with no host sync "
                                          "between")

    def for_device(self, device: str) -> "SchedulerConfig":
        """A copy with the defaults that depend on the device ("cuda" or "cpu") filled in. On the CPU a step of
        the default model computes ~100 prompt tokens a second: a small budget, shared, keeps a short request's
        first token within seconds of its arrival while a long prompt prefills."""
        on_gpu = device != "cpu"
        budget = self.max_num_batched_tokens or (8192 if on_gpu else 512)
        threshold = self.long_prefill_token_threshold or (budget if on_gpu else budget // 2)
        return dataclasses.replace(self, max_num_batched_tokens=budget, long_prefill_token_threshold=threshold)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        parts = {}
        for name, part_cls in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in dataclasses.fields(part_cls)}
            parts[name] = part_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        config = cls(**parts)
        config.validate()
        return config

    def validate(self) -> None:
        c, s = self.cache, self.scheduler
        if c.block_size <= 0 or c.block_size & (c.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {c.block_size}")
        if not 0.0 < c.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {c.gpu_memory_utilization}")
        if s.max_num_seqs <= 0 or (s.max_num_batched_tokens or 1) <= 0 or (s.long_prefill_token_threshold or 1) <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and long_prefill_token_threshold must be positive")
        if s.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be >= 1, got {s.num_scheduler_steps}")
        if s.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {s.policy!r}")
        if self.model.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.model.tensor_parallel_size}")
        if self.model.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.model.load_format!r}")


# ---- as command-line flags -----------------------------------------------------------------------------------
_PARTS = (ModelConfig, CacheConfig, SchedulerConfig)
_TYPES = {"int": int, "float": float, "str": str}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every field of every concern as a flag: --max-num-seqs, --block-size, --no-enable-prefix-caching..."""
    group = parser.add_argument_group("engine")
    for part in _PARTS:
        for f in dataclasses.fields(part):
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type).split(" | ")[0]
            help = f.metadata["help"]         # says what None means, where a field defaults to None
            help = help if "default" in help else f"{help} (default: %(default)s)"
            if kind == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
            else:
                group.add_argument(flag, type=_TYPES[kind], default=f.default, metavar=kind.upper(), help=help)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine options among parsed flags, for EngineConfig.from_kwargs (or LLM(**kwargs))."""
    names = {f.name for part in _PARTS for f in dataclasses.fields(part)}
    return {k: v for k, v in vars(args).items() if k in names}
