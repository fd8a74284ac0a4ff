"""Writing this step's keys and values into the paged KV cache.

k, v: [T, KVH, D]; caches: [num_blocks, block_size, KVH, D], contiguous, so flat slot s = block * block_size + offset
is row s of a [num_blocks * block_size, KVH * D] matrix. Token t's K row and V row (KVH * D elements each: 1024,
2 KiB in bf16 for Llama-3-8B) go to row slot_mapping[t]; slot < 0 (a padding row of a CUDA-graph batch) writes
nothing. Each [KVH, D] row must be contiguous; the token stride is free, because v arrives as a view of the fused
qkv projection's output and copying it first would cost a pass over it.

One program per token copies both rows: a pure copy, memory-bound, 4 * KVH * D * itemsize bytes per token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_token_stride, v_token_stride,
                     ROW: tl.constexpr,           # KVH * D elements per token
                     BLOCK_ROW: tl.constexpr):    # ROW rounded up to a power of two
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:                                 # one scalar branch: a padding row reads nothing either
        cols = tl.arange(0, BLOCK_ROW)
        mask = cols < ROW
        k = tl.load(k_ptr + t * k_token_stride + cols, mask=mask)
        v = tl.load(v_ptr + t * v_token_stride + cols, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + cols, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + cols, v, mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    assert x.dim() == 3, f"{name}: expected [T, KVH, D], got {tuple(x.shape)}"
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], f"{name}: each token's [KVH, D] must be contiguous"


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D] into caches [num_blocks, block_size, KVH, D] at flat slots slot_mapping [T] (int64);
    slot < 0 is skipped. In place, no host reads: CUDA-graph capturable."""
    _check_rows(k, "k")
    _check_rows(v, "v")
    T, KVH, D = k.shape
    assert v.shape == k.shape and k_cache.shape == v_cache.shape and k_cache.shape[2:] == (KVH, D)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (T,) and slot_mapping.is_contiguous()
    if T == 0:
        return
    ROW = KVH * D
    BLOCK_ROW = triton.next_power_of_2(ROW)
    # 16-byte vectors: one warp moves 512 bytes per access, so BLOCK_ROW * itemsize / 512 warps cover the row in a
    # single vector access per thread (4 warps for Llama-3-8B's 1024 bf16 values).
    num_warps = max(1, min(8, BLOCK_ROW * k.element_size() // 512))
    _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=ROW, BLOCK_ROW=BLOCK_ROW, num_warps=num_warps)


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """engine.attention.write_kv, with slot < 0 skipped (boolean indexing: a host sync, fine for a reference)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]
