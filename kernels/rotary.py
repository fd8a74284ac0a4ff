"""Rotary position embedding, Hugging Face's half-rotation layout, for q and k in one launch.

For each head, with x1, x2 its two halves and (cos, sin) the row of cos_sin at the token's position:
    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
cos_sin: [max_pos, Dh] fp32 holding [cos(angles) | sin(angles)] (engine.models.llama.RotaryEmbedding.build).

Rounding, matched to apply_rotary_reference below (the model's CPU path; equal bit for bit to Hugging Face's
apply_rotary_pos_emb): cos and sin are first cast to the tensor's dtype (`cos_sin[positions].to(q.dtype)`); each product is rounded to that dtype, then the difference or
sum is rounded again, as torch's bf16/fp16 elementwise ops do (each op in fp32, rounded to the dtype). A product of
two bf16 (or fp16) values is exact in fp32, so the kernel's results equal the reference's bit for bit, in fp32 too.
That needs FMA contraction off (enable_fp_fusion=False): left on, LLVM narrows the rounded fp32 ops to bf16 ops
(a valid step) and then fuses x1 * cos - x2 * sin into one bf16 FMA, which skips the product's rounding (seen in
the sm_90 PTX: fma.rn.bf16x2). The kernel is memory-bound: the separate multiply costs nothing measurable.

q: [T, H, Dh], k: [T, KVH, Dh]: each token's [heads, Dh] contiguous, the token stride free (q and k arrive as views
of the fused qkv projection). Outputs are new contiguous tensors (or out buffers). One program per token rotates
all of its q heads and k heads with one load of its cos/sin row: one pass over q and k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, n_heads, cos, sin, d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """x_ptr, out_ptr: one token's [n_heads, 2 * HALF]; cos, sin: [BLOCK_HALF] fp32, already rounded to dt."""
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & d_mask[None, :]
    offs = h[:, None] * (2 * HALF) + d[None, :]
    dt = out_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    # Round each product to dt before the add, as torch does (the launch turns FMA contraction off to keep it so).
    o1 = (x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(out_ptr + offs, o1.to(dt), mask=mask)
    tl.store(out_ptr + offs + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr, q_token_stride, k_token_stride,
                   H, KVH,
                   HALF: tl.constexpr,          # Dh / 2
                   BLOCK_HALF: tl.constexpr,    # HALF rounded up to a power of two
                   BLOCK_HQ: tl.constexpr,      # H rounded up to a power of two: all q heads in one tile
                   BLOCK_HK: tl.constexpr):     # KVH rounded up likewise
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    dt = q_out_ptr.dtype.element_ty
    row = cos_sin_ptr + pos * (2 * HALF)
    cos = tl.load(row + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)          # `.to(q.dtype)` of the table
    sin = tl.load(row + HALF + d, mask=d_mask, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(q_ptr + t * q_token_stride, q_out_ptr + t * (H * 2 * HALF), H, cos, sin, d, d_mask,
                  HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + t * k_token_stride, k_out_ptr + t * (KVH * 2 * HALF), KVH, cos, sin, d, d_mask,
                  HALF, BLOCK_HK)


def _check_heads(x: torch.Tensor, name: str) -> None:
    assert x.dim() == 3, f"{name}: expected [T, heads, Dh], got {tuple(x.shape)}"
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], f"{name}: each token's [heads, Dh] must be contiguous"


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                 q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """q [T, H, Dh], k [T, KVH, Dh], positions int64 [T], cos_sin fp32 [max_pos, Dh] -> (q_out, k_out), new
    contiguous tensors (or the given buffers). Positions must be < max_pos (not checked on the device)."""
    _check_heads(q, "q")
    _check_heads(k, "k")
    T, H, Dh = q.shape
    KVH = k.shape[1]
    assert k.shape == (T, KVH, Dh) and k.dtype == q.dtype and Dh % 2 == 0
    assert positions.dtype == torch.int64 and positions.shape == (T,) and positions.is_contiguous()
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[1] == Dh and cos_sin.is_contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    assert q_out.shape == q.shape and q_out.dtype == q.dtype and q_out.is_contiguous()
    assert k_out.shape == k.shape and k_out.dtype == k.dtype and k_out.is_contiguous()
    if T == 0:
        return q_out, k_out
    HALF = Dh // 2
    BLOCK_HQ, BLOCK_HK = triton.next_power_of_2(H), triton.next_power_of_2(KVH)
    # A token's q + k is (H + KVH) * Dh values (40 * 128 = 5120, 10 KiB in bf16 for Llama-3-8B): 4 warps give each
    # thread 16-byte accesses and ~40 values in flight; larger tokens (more heads) take 8.
    num_warps = 4 if (BLOCK_HQ + BLOCK_HK) * Dh <= 8192 else 8
    _rotary_kernel[(T,)](q, k, q_out, k_out, positions, cos_sin, q.stride(0), k.stride(0), H, KVH,
                         HALF=HALF, BLOCK_HALF=triton.next_power_of_2(HALF), BLOCK_HQ=BLOCK_HQ, BLOCK_HK=BLOCK_HK,
                         num_warps=num_warps, enable_fp_fusion=False)
    return q_out, k_out


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)                                                   # [T, heads, Dh/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                           q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """RotaryEmbedding.forward of engine.models.llama."""
    cos, sin = cos_sin[positions].to(q.dtype).chunk(2, dim=-1)                   # [T, Dh/2] each
    q, k = _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)
    return (q if q_out is None else q_out.copy_(q)), (k if k_out is None else k_out.copy_(k))
