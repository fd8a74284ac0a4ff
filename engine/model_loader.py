"""Builds our model for a resolved checkpoint: the right class, dtype and device, weights loaded or random."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.models.llama import LlamaArgs, LlamaForCausalLM
from engine.ops import Ops
from engine.tensor_parallel import TensorParallel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, hf_config: dict, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32        # CPU matmuls are fastest and exact in fp32
    declared = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return torch.float16 if declared in ("float16", "fp16") else torch.bfloat16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def iterate_safetensors(model_dir: Path, progress: bool = True):
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    names = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            names += [(f, k) for k in st.keys()]
    handles = {}
    try:
        for f, name in tqdm(names, desc="loading weights", unit="tensor", disable=not progress, leave=False):
            if f not in handles:
                handles[f] = safe_open(f, framework="pt")
            yield name, handles[f].get_tensor(name)
    finally:
        handles.clear()


def build_model(hf_config: dict, model_dir: Path | None, max_len: int, device: torch.device, dtype: torch.dtype,
                ops: Ops, load_format: str = "auto", seed: int = 0, progress: bool = True,
                tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """With tp: this rank's shard, read from the whole checkpoint (each rank reads what it keeps)."""
    args = LlamaArgs.from_hf_config(hf_config)
    # Build on the meta device and materialize uninitialized: random init of billions of weights would be wasted.
    with torch.device("meta"), _default_dtype(dtype):
        model = LlamaForCausalLM(args, max_len, ops, tp)
    model = model.to_empty(device=device)
    with torch.no_grad():
        if load_format == "dummy":
            model.init_dummy_weights(seed)
        else:
            if model_dir is None:
                raise ValueError("real weights need a model directory (or use load_format='dummy')")
            model.load_weights(iterate_safetensors(model_dir, progress))
    model.rotary.build(device)
    return model.eval()
