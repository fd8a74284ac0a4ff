"""The model's kernels, chosen once per model: Triton on the GPU, the PyTorch references elsewhere.

Every op of kernels/ comes as a Triton kernel and its PyTorch reference; a model holds one Ops and calls through
it, so the two paths run the very same model code (which is what the GPU equality checks compare).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.attention import TorchAttention, TritonAttention


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable            # (x, weight, eps) -> out
    add_rms_norm: Callable        # (x, residual, weight, eps) -> (out, x + residual)
    apply_rotary: Callable        # (q, k, positions, cos_sin, q_out=None, k_out=None) -> (q, k)
    silu_and_mul: Callable        # (x [T, 2I]) -> [T, I]
    attention: Callable           # (q, k, v, k_cache, v_cache, metadata, scale, out=None) -> out; writes k, v
                                  # first


def torch_ops() -> Ops:
    from kernels.activation import silu_and_mul_reference
    from kernels.norm import add_rms_norm_reference, rms_norm_reference
    from kernels.rotary import apply_rotary_reference
    return Ops("torch", rms_norm_reference, add_rms_norm_reference, apply_rotary_reference, silu_and_mul_reference,
               TorchAttention())


def triton_ops() -> Ops:
    from kernels.activation import silu_and_mul
    from kernels.norm import add_rms_norm, rms_norm
    from kernels.rotary import apply_rotary
    return Ops("triton", rms_norm, add_rms_norm, apply_rotary, silu_and_mul, TritonAttention())


def select_ops(backend: str, device: torch.device) -> Ops:
    """auto: Triton on CUDA, the references on the CPU ("triton" on the CPU runs Triton's interpreter, which
    needs TRITON_INTERPRET=1: that is how CI tests the kernels)."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"kernel_backend must be auto, triton or torch, got {backend!r}")
    return triton_ops() if backend == "triton" else torch_ops()
