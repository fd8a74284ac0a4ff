"""SiLU-and-multiply, the Llama MLP's activation: x [T, 2I] (gate | up, as the fused gate_up_proj produces) ->
silu(gate) * up [T, I].

Rounding, matched to the reference `F.silu(gate) * up` in the input dtype dt: torch computes silu in fp32 as
g / (1 + exp(-g)) and rounds it to dt, then multiplies by up in fp32 and rounds again. The kernel does the same
steps in fp32 registers with the same two roundings; a product of two bf16 values is exact in fp32, so only the
fp32 silu can differ. On the GPU it uses CUDA's expf (libdevice) and an IEEE division, as torch's CUDA silu does,
so the fp32 silu, and with it the bf16 output, should match torch's CUDA kernel bit for bit (to be confirmed on
the GPU: test_silu_and_mul reports the exact fraction). Under the interpreter exp is numpy's: rare one-ulp
differences from torch's CPU exp, which a bf16 rounding almost always absorbs.

One program per (token, BLOCK_I columns): 16-byte loads of gate and up, one 16-byte store; memory-bound,
3 * I * itemsize bytes per token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK_I = 1024          # columns per program: 4 warps x 32 threads x 8 bf16 (one 16-byte vector each)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I,
                         BLOCK_I: tl.constexpr,
                         PRECISE_EXP: tl.constexpr):   # CUDA's expf (the interpreter has no libdevice)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < I
    row = x_ptr + t * (2 * I)
    g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + I + cols, mask=mask, other=0.0).to(tl.float32)
    if PRECISE_EXP:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    dt = out_ptr.dtype.element_ty
    silu = tl.math.div_rn(g, 1.0 + e).to(dt).to(tl.float32)        # F.silu rounds to dt
    tl.store(out_ptr + t * I + cols, (silu * u).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., 2I] contiguous -> silu(x[..., :I]) * x[..., I:], a new tensor [..., I] (or `out`)."""
    assert x.is_contiguous() and x.shape[-1] % 2 == 0
    I = x.shape[-1] // 2
    shape = (*x.shape[:-1], I)
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == shape and out.dtype == x.dtype and out.is_contiguous()
    T = x.numel() // (2 * I) if I else 0
    if T == 0:
        return out
    grid = (T, triton.cdiv(I, BLOCK_I))
    # No FMA contraction: every multiply and add rounds as torch's do (libdevice's expf uses its own explicit FMAs).
    _silu_and_mul_kernel[grid](x, out, I, BLOCK_I=BLOCK_I, PRECISE_EXP=not triton.knobs.runtime.interpret,
                               num_warps=4, enable_fp_fusion=False)
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """What engine.models.llama.MLP does between its two projections."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
