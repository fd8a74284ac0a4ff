"""RMSNorm, and RMSNorm fused with the residual add that precedes it, in Hugging Face's rounding order.

LlamaRMSNorm (engine.models.llama.RMSNorm), for x of dtype dt:
    summed = x + residual                                   (in dt: the add rounds to the model dtype)
    n      = (summed_f32 * rsqrt(mean(summed_f32^2) + eps)).to(dt)
    out    = weight * n                                     (in torch's promotion of weight and dt)
The kernel does exactly these steps and roundings, with the row in fp32 registers: it reads x (and residual) once
and writes out (and summed) once; summed is bit-exact. The fp32 rstd can differ from torch's in its last bits: the
sum of squares is a tree over the row in another order than torch's; the mean multiplies by fp32(1/D) (as torch's
CUDA mean does; its CPU mean divides); rsqrt is __nv_rsqrtf (rsqrt.approx in the sm_90 PTX). So a bf16 output now
and then differs by one unit in the last place; everything after rstd rounds exactly as torch does.

x: [..., D] contiguous (D up to 8192, any D: 4096, 576, ...). Several rows per program when D is small, so a
program still moves a few KiB.

The end of this file has bench_small_kernels(), timing every kernel in this package against its reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_rows, D, inv_D, eps,
                     HAS_RESIDUAL: tl.constexpr,
                     BLOCK_M: tl.constexpr,      # rows per program
                     BLOCK_D: tl.constexpr):     # D rounded up to a power of two: the whole row in registers
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(sum_ptr.dtype.element_ty)            # HF adds in the model dtype
        tl.store(sum_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)
    # mean = sum * fp32(1/D), as torch's CUDA mean does (and no approximate division); masked columns add 0.
    var = tl.sum(x * x, axis=1) * inv_D
    rstd = tl.math.rsqrt(var + eps)
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)   # normalize in fp32, round to dt
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    # bf16 * bf16 is exact in fp32, so one rounding here equals torch's bf16 multiply.
    tl.store(out_ptr + offs, (n * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, summed):
    D = x.shape[-1]
    assert x.is_contiguous(), "x must be contiguous"
    assert weight.shape == (D,) and weight.is_contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)       # what `weight * n` gives in torch
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == out_dtype and out.is_contiguous()
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
        if summed is None:
            summed = torch.empty_like(x)
        assert summed.shape == x.shape and summed.dtype == x.dtype and summed.is_contiguous()
    n_rows = x.numel() // D if D else 0
    if n_rows == 0:
        return out, summed
    BLOCK_D = triton.next_power_of_2(D)
    # Small rows: pack rows until a program holds ~2K values (e.g. 2 rows of 576, 16 heads of 128 for q/k norm).
    BLOCK_M = max(1, min(32, 2048 // BLOCK_D))
    # 16-byte accesses (8 bf16) per thread: 4 warps cover 1024 values per access, 8 warps 2048. Keep 8-32 fp32
    # values of the row per thread: enough loads in flight, no spills.
    tile = BLOCK_M * BLOCK_D
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    grid = (triton.cdiv(n_rows, BLOCK_M),)
    # No FMA contraction: the squares round before they are summed, as in torch's x32.pow(2).mean(); the products
    # after the reduction round as torch's do. Memory-bound: the unfused multiplies cost nothing measurable.
    _rms_norm_kernel[grid](x, residual if residual is not None else x, weight, out,
                           summed if summed is not None else out, n_rows, D, 1.0 / D, eps,
                           HAS_RESIDUAL=residual is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                           num_warps=num_warps, enable_fp_fusion=False)
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., D], weight: [D] -> weight * normalize(x), a new tensor (or `out`, which may be x itself)."""
    return _launch(x, None, weight, eps, out, None)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None, summed: torch.Tensor | None = None):
    """-> (rms_norm(x + residual), x + residual). New tensors, or `out` and `summed`; those may alias x and residual
    (in-place use): each program reads all of its rows before it writes any of them."""
    return _launch(x, residual, weight, eps, out, summed)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


# ---- benchmarks of all the small kernels ---------------------------------------------------------------------------
def bench_small_kernels(dtype: torch.dtype = torch.bfloat16, token_counts=(256, 8192),
                        device: str = "cuda") -> list[dict]:
    """Times each small kernel against its PyTorch reference on Llama-3-8B shapes, T = 256 (decode) and 8192
    (prefill), with triton.testing.do_bench (median; it flushes L2 before each call, so these are cold-cache
    numbers). Prints GB/s = the fewest bytes each op must move / time. Run on the GPU: python -m kernels.norm"""
    from triton.testing import do_bench

    from kernels.activation import silu_and_mul, silu_and_mul_reference
    from kernels.advance_step import advance_step, advance_step_reference
    from kernels.kv_cache import write_kv, write_kv_reference
    from kernels.rotary import apply_rotary, apply_rotary_reference

    dev = device
    D, H, KVH, Dh, I, eps, block_size = 4096, 32, 8, 128, 14336, 1e-5, 16
    isz = torch.tensor([], dtype=dtype).element_size()
    rows = []

    def bench(name, T, nbytes, fn, ref):
        t_k = do_bench(fn, warmup=25, rep=200, return_mode="median")
        t_r = do_bench(ref, warmup=25, rep=200, return_mode="median")
        rows.append(dict(kernel=name, T=T, bytes=nbytes, triton_us=t_k * 1e3, torch_us=t_r * 1e3,
                         triton_gbs=nbytes / t_k / 1e6, torch_gbs=nbytes / t_r / 1e6))

    torch.manual_seed(0)
    for T in token_counts:
        x = torch.randn(T, D, device=dev, dtype=dtype)
        res = torch.randn(T, D, device=dev, dtype=dtype)
        w = torch.randn(D, device=dev, dtype=dtype)
        bench("rms_norm", T, (2 * T * D + D) * isz, lambda: rms_norm(x, w, eps), lambda: rms_norm_reference(x, w, eps))
        bench("add_rms_norm", T, (4 * T * D + D) * isz, lambda: add_rms_norm(x, res, w, eps),
              lambda: add_rms_norm_reference(x, res, w, eps))

        qkv = torch.randn(T, (H + 2 * KVH) * Dh, device=dev, dtype=dtype)      # q, k as views, like the model
        q = qkv[:, :H * Dh].view(T, H, Dh)
        k = qkv[:, H * Dh:(H + KVH) * Dh].view(T, KVH, Dh)
        v = qkv[:, (H + KVH) * Dh:].view(T, KVH, Dh)
        max_pos = 8192
        angles = torch.rand(max_pos, Dh // 2, device=dev) * 100
        cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
        positions = torch.randint(0, max_pos, (T,), device=dev)
        bench("rotary", T, 2 * T * (H + KVH) * Dh * isz + T * Dh * 4 + T * 8,
              lambda: apply_rotary(q, k, positions, cos_sin), lambda: apply_rotary_reference(q, k, positions, cos_sin))

        gate_up = torch.randn(T, 2 * I, device=dev, dtype=dtype)
        bench("silu_and_mul", T, 3 * T * I * isz, lambda: silu_and_mul(gate_up),
              lambda: silu_and_mul_reference(gate_up))

        num_blocks = max(2 * T // block_size, 64)
        k_cache = torch.randn(num_blocks, block_size, KVH, Dh, device=dev, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        slots = torch.randperm(num_blocks * block_size, device=dev)[:T]
        kc = k.contiguous()
        bench("write_kv", T, 4 * T * KVH * Dh * isz + T * 8, lambda: write_kv(kc, v, k_cache, v_cache, slots),
              lambda: write_kv_reference(kc, v, k_cache, v_cache, slots))

    for B in (256,):
        max_blocks = 64
        state = dict(input_ids=torch.randint(0, 1000, (B,), device=dev),
                     positions=torch.randint(0, 512, (B,), device=dev),
                     seq_lens=torch.randint(1, 512, (B,), device=dev, dtype=torch.int32),
                     slot_mapping=torch.zeros(B, device=dev, dtype=torch.int64),
                     block_tables=torch.randint(0, 4096, (B, max_blocks), device=dev, dtype=torch.int32),
                     steps_left=torch.full((B,), 1 << 30, device=dev, dtype=torch.int32))
        sampled = torch.randint(0, 1000, (B,), device=dev)
        # per row: sampled 8, input_ids 8 (write), positions 8+8, seq_lens 4+4, slot 8, a block-table entry 4,
        # steps_left 4+4: latency-bound at any batch size, so read its time, not its GB/s.
        nbytes = B * 60
        s = state
        bench("advance_step", B, nbytes,
              lambda: advance_step(sampled, s["input_ids"], s["positions"], s["seq_lens"], s["slot_mapping"],
                                   s["block_tables"], s["steps_left"], block_size),
              lambda: advance_step_reference(sampled, s["input_ids"], s["positions"], s["seq_lens"],
                                             s["slot_mapping"], s["block_tables"], s["steps_left"], block_size))

    print(f"{'kernel':<14}{'T':>6}{'MB':>9}{'triton us':>11}{'GB/s':>8}{'torch us':>10}{'GB/s':>8}{'speedup':>9}")
    for r in rows:
        print(f"{r['kernel']:<14}{r['T']:>6}{r['bytes'] / 1e6:>9.2f}{r['triton_us']:>11.1f}{r['triton_gbs']:>8.0f}"
              f"{r['torch_us']:>10.1f}{r['torch_gbs']:>8.0f}{r['torch_us'] / r['triton_us']:>8.2f}x")
    return rows


if __name__ == "__main__":
    bench_small_kernels()
