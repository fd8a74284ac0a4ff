"""The small Triton kernels (kernels/{kv_cache,norm,rotary,activation,advance_step}.py) against their references.

On a machine without CUDA they run under Triton's interpreter at small, odd sizes; with CUDA the same tests run on
the GPU and add Llama-3-8B sizes (T=8192, D=4096, 32/8 heads of 128, I=14336). Every output is poisoned with NaN
first, so an element the kernel never wrote fails the test. Inputs are fresh random draws for every test.

Claims checked: write_kv, rotary, advance_step and the residual sum are bit-exact in every dtype; rms_norm and
silu_and_mul round exactly as torch does but may differ in an fp32 intermediate (the order of the sum of squares, an
ulp of exp), so in bf16 almost every element matches exactly (a floor on the exact fraction) and all are within
METHOD.md's relative error (1e-2); in fp32 within 1e-5.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:       # conftest.py sets it too; it must come before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton                                          # noqa: E402

from engine.models.llama import LlamaArgs, rotary_inv_freq                                 # noqa: E402
from kernels.activation import silu_and_mul, silu_and_mul_reference                        # noqa: E402
from kernels.advance_step import advance_step, advance_step_reference                      # noqa: E402
from kernels.kv_cache import write_kv, write_kv_reference                                  # noqa: E402
from kernels.norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference  # noqa: E402
from kernels.norm import _launch as _norm_launch                                           # noqa: E402
from kernels.rotary import apply_rotary, apply_rotary_reference                            # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Sizes by device: the interpreter runs each program in Python, so the CPU keeps to small odd shapes.
TS = (1, 37, 8192) if ON_GPU else (1, 37)
NORM_DS = (4096, 576, 8192) if ON_GPU else (576, 64)
HEADS = (32, 8, 128) if ON_GPU else (6, 2, 64)          # H, KVH, Dh (6 and 2 -> masked head tiles on the CPU)
INTERMEDIATE = (14336, 1100) if ON_GPU else (1100,)       # 1100: a partial last column block
MAX_POS = 8192 if ON_GPU else 300
EPS = 1e-5


# ---- helpers ----------------------------------------------------------------------------------------------------
def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return ((out64 - ref64).norm() / ref64.norm()).item()


def check(out: torch.Tensor, ref: torch.Tensor, name: str, exact: bool = False, bf16_min_exact: float = 0.0):
    """exact: bit-for-bit in every dtype; otherwise fp32 within 1e-5, bf16 within 1e-2 (METHOD.md) and at least
    bf16_min_exact of the elements bit-exact."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, name
    assert not torch.isnan(out).any(), f"{name}: {int(torch.isnan(out).sum())} elements never written"
    err = rel_err(out, ref)
    same = (out == ref).float().mean().item()
    if exact:
        assert same == 1.0, f"{name}: claimed bit-exact, {100 * (1 - same):.4f}% of elements differ (err {err:.1e})"
    if out.dtype == torch.float32:
        assert err < 1e-5, f"{name}: fp32 relative error {err:.2e}"
        return
    assert err < 1e-2, f"{name}: relative error {err:.2e}"
    assert same >= bf16_min_exact, f"{name}: only {100 * same:.3f}% of elements bit-exact"


def llama_args(head_dim: int, rope_scaling: dict | None) -> LlamaArgs:
    cfg = dict(model_type="llama", vocab_size=128, hidden_size=4 * head_dim, intermediate_size=256,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
               rope_theta=500000.0, max_position_embeddings=MAX_POS)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    return LlamaArgs.from_hf_config(cfg)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def cos_sin_table(head_dim: int) -> torch.Tensor:
    """[MAX_POS, Dh] fp32 [cos | sin], as RotaryEmbedding.build makes it (llama3-scaled frequencies)."""
    inv_freq = rotary_inv_freq(llama_args(head_dim, LLAMA3_SCALING))
    angles = torch.arange(MAX_POS, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEV)


# ---- the references are Hugging Face's ops (the model calls the references through engine.ops) ---------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_references_match_hugging_face(dtype):
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
    torch.manual_seed(1)
    T, D = 37, 576
    with torch.no_grad():
        norm = LlamaRMSNorm(D, eps=EPS).to(DEV, dtype)
        norm.weight.normal_()
        x, res = torch.randn(T, D, device=DEV, dtype=dtype), torch.randn(T, D, device=DEV, dtype=dtype)
        assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, EPS))
        out, summed = add_rms_norm_reference(x, res, norm.weight, EPS)
        assert torch.equal(summed, res + x) and torch.equal(out, norm(res + x))     # HF: residual + hidden_states

        H, KVH, Dh = HEADS
        cos_sin = cos_sin_table(Dh)
        q = torch.randn(T, H, Dh, device=DEV, dtype=dtype)
        k = torch.randn(T, KVH, Dh, device=DEV, dtype=dtype)
        positions = torch.randint(0, MAX_POS, (T,), device=DEV)
        c, s = cos_sin[positions].chunk(2, dim=-1)                   # HF: cos = cat(freqs, freqs).cos(), in dt
        cos, sin = torch.cat([c, c], -1).to(dtype), torch.cat([s, s], -1).to(dtype)
        hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        ref_q, ref_k = apply_rotary_reference(q, k, positions, cos_sin)
        assert torch.equal(hf_q, ref_q) and torch.equal(hf_k, ref_k)

        gate_up = torch.randn(T, 2 * 200, device=DEV, dtype=dtype) * 3
        assert torch.equal(ACT2FN["silu"](gate_up[:, :200]) * gate_up[:, 200:], silu_and_mul_reference(gate_up))

    kc, vc = nan_like((8, 4, KVH, Dh), dtype), nan_like((8, 4, KVH, Dh), dtype)
    slots = torch.randperm(32, device=DEV)[:10]
    slots[3] = -1
    kk, vv = torch.randn(10, KVH, Dh, device=DEV, dtype=dtype), torch.randn(10, KVH, Dh, device=DEV, dtype=dtype)
    write_kv_reference(kk, vv, kc, vc, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, KVH, Dh)[slots[keep]], kk[keep])
    assert torch.equal(vc.view(-1, KVH, Dh)[slots[keep]], vv[keep])
    assert int(torch.isnan(kc.view(-1, KVH * Dh)).all(-1).sum()) == 32 - 9       # slot -1 wrote nothing


# ---- write_kv -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv(dtype, T):
    torch.manual_seed(T)
    KVH, D = (8, 128) if ON_GPU else (3, 32)        # 3 * 32 = 96 values per token: a masked row on the CPU
    block_size = 16 if ON_GPU else 4
    num_blocks = triton.cdiv(T, block_size) * 2 + 3
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:T]
    if T > 1:
        slots[torch.rand(T, device=DEV) < 0.25] = -1        # padding rows of a graph batch
        slots[-1] = -1
    k = torch.randn(T, KVH, D, device=DEV, dtype=dtype)
    v = torch.randn(T, 3 * KVH, D, device=DEV, dtype=dtype)[:, KVH:2 * KVH]   # a view with a token stride of its own
    k_cache, v_cache = (nan_like((num_blocks, block_size, KVH, D), dtype) for _ in range(2))
    write_kv(k, v, k_cache, v_cache, slots)

    keep = slots >= 0
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEV)
    written[slots[keep]] = True
    for cache, src in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, KVH, D)
        assert torch.equal(flat[slots[keep]], src[keep]), "written rows differ from k/v"
        assert torch.isnan(flat[~written]).all(), "a slot that no token maps to (or slot -1) was written"
    ref_k, ref_v = nan_like(k_cache.shape, dtype), nan_like(v_cache.shape, dtype)
    write_kv_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache.nan_to_num(7.0), ref_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), ref_v.nan_to_num(7.0))


# ---- rms_norm, add_rms_norm ---------------------------------------------------------------------------------------
# bf16: only the fp32 sum of squares is ordered differently from torch's, so nearly every element is exact.
NORM_MIN_EXACT = 0.99


@pytest.mark.parametrize("D", NORM_DS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, T, D):
    torch.manual_seed(T * 7 + D)
    x = torch.randn(T, D, device=DEV, dtype=dtype) * 3
    w = torch.randn(D, device=DEV, dtype=dtype)
    out = rms_norm(x, w, EPS, out=nan_like((T, D), dtype))
    check(out, rms_norm_reference(x, w, EPS), "rms_norm", bf16_min_exact=NORM_MIN_EXACT)
    check(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS), "rms_norm (new output)", bf16_min_exact=NORM_MIN_EXACT)


@pytest.mark.parametrize("D", NORM_DS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype, T, D):
    torch.manual_seed(T * 11 + D)
    x = torch.randn(T, D, device=DEV, dtype=dtype)
    res = torch.randn(T, D, device=DEV, dtype=dtype) * 4
    w = torch.randn(D, device=DEV, dtype=dtype)
    out, summed = add_rms_norm(x, res, w, EPS, out=nan_like((T, D), dtype), summed=nan_like((T, D), dtype))
    ref_out, ref_summed = add_rms_norm_reference(x, res, w, EPS)
    check(summed, ref_summed, "summed", exact=True)     # one rounded add: exact in any dtype
    assert torch.equal(summed, ref_summed)
    check(out, ref_out, "add_rms_norm", bf16_min_exact=NORM_MIN_EXACT)


def test_norm_shapes_and_aliasing():
    """q/k-norm shape ([T, H, Dh], many rows per program) and in-place use (out=x, summed=residual)."""
    torch.manual_seed(3)
    dtype = torch.bfloat16
    H, _, Dh = HEADS
    q = torch.randn(37, H, Dh, device=DEV, dtype=dtype)
    w = torch.randn(Dh, device=DEV, dtype=dtype)
    check(rms_norm(q, w, EPS, out=nan_like(q.shape, dtype)), rms_norm_reference(q, w, EPS), "q norm",
          bf16_min_exact=NORM_MIN_EXACT)
    D = NORM_DS[-1]
    x, res = torch.randn(37, D, device=DEV, dtype=dtype), torch.randn(37, D, device=DEV, dtype=dtype)
    wd = torch.randn(D, device=DEV, dtype=dtype)
    ref_out, ref_summed = add_rms_norm_reference(x, res, wd, EPS)
    out, summed = add_rms_norm(x, res, wd, EPS, out=x, summed=res)
    assert out.data_ptr() == x.data_ptr() and summed.data_ptr() == res.data_ptr()
    assert torch.equal(summed, ref_summed)
    check(out, ref_out, "in-place add_rms_norm", bf16_min_exact=NORM_MIN_EXACT)
    # fp32 weight over bf16 activations promotes the output to fp32, like torch's `weight * n`.
    w32 = torch.randn(D, device=DEV)
    out32 = rms_norm(ref_summed, w32, EPS)
    assert out32.dtype == torch.float32
    check(out32, rms_norm_reference(ref_summed, w32, EPS), "fp32 weight")


# ---- rotary -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype, T):
    torch.manual_seed(T + 5)
    H, KVH, Dh = HEADS
    cos_sin = cos_sin_table(Dh)
    qkv = torch.randn(T, (H + 2 * KVH) * Dh, device=DEV, dtype=dtype) * 2     # q, k: views, as in the model
    q = qkv[:, :H * Dh].view(T, H, Dh)
    k = qkv[:, H * Dh:(H + KVH) * Dh].view(T, KVH, Dh)
    positions = torch.randint(0, MAX_POS, (T,), device=DEV)
    positions[0] = MAX_POS - 1                           # the table's last row
    if T > 1:
        positions[1] = 0
    q_out, k_out = apply_rotary(q, k, positions, cos_sin,
                                q_out=nan_like(q.shape, dtype), k_out=nan_like(k.shape, dtype))
    ref_q, ref_k = apply_rotary_reference(q, k, positions, cos_sin)
    check(q_out, ref_q, "rotary q", exact=True)
    check(k_out, ref_k, "rotary k", exact=True)
    q2, k2 = apply_rotary(q.contiguous(), k.contiguous(), positions, cos_sin)      # contiguous inputs, new outputs
    assert torch.equal(q2, q_out) and torch.equal(k2, k_out)


# ---- silu_and_mul -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("I", INTERMEDIATE)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, T, I):
    torch.manual_seed(T + I)
    x = torch.randn(T, 2 * I, device=DEV, dtype=dtype) * 3
    out = silu_and_mul(x, out=nan_like((T, I), dtype))
    # bf16: the same roundings as torch; only an ulp of the fp32 exp can flip a bf16 rounding, rarely.
    check(out, silu_and_mul_reference(x), "silu_and_mul", bf16_min_exact=0.999)


# ---- advance_step -------------------------------------------------------------------------------------------------
def advance_step_python(sampled, input_ids, positions, seq_lens, slot_mapping, block_tables, steps_left, block_size):
    """The specification, row by row on Python lists (an oracle for the vectorized reference too)."""
    for b in range(len(sampled)):
        if steps_left[b] > 0:
            input_ids[b] = sampled[b]
            positions[b] += 1
            seq_lens[b] += 1
            index = positions[b] // block_size
            row = block_tables[b]
            slot_mapping[b] = row[index] * block_size + positions[b] % block_size if index < len(row) else -1
            steps_left[b] -= 1
        else:
            slot_mapping[b] = -1


@pytest.mark.parametrize("B, Bg", [(9, 12), (12, 12), (1, 4)] + ([(500, 512)] if ON_GPU else []))
def test_advance_step(B, Bg):
    torch.manual_seed(B * 100 + Bg)
    block_size, max_blocks, n_steps = (16, 64, 6) if ON_GPU else (4, 6, 5)
    capacity = block_size * max_blocks
    steps_left = torch.randint(0, n_steps, (Bg,), dtype=torch.int32)      # every row runs out within n_steps
    positions = torch.stack([torch.randint(0, capacity - int(s), ()) for s in steps_left]).long()
    if B >= 3:
        steps_left[:3] = torch.tensor([0, 3, 4], dtype=torch.int32)       # done already; two that cross blocks
        positions[1] = block_size - 2
        positions[2] = capacity - 3                                       # runs past its table at the 3rd step
    state = dict(input_ids=torch.randint(0, 50000, (Bg,)), positions=positions, seq_lens=(positions + 1).int(),
                 slot_mapping=torch.randint(-1, 1000, (Bg,)),
                 block_tables=torch.randperm(Bg * max_blocks).int().view(Bg, max_blocks), steps_left=steps_left)
    names = list(state)
    gpu = {n: t.to(DEV) for n, t in state.items()}
    ref = {n: t.clone().to(DEV) for n, t in state.items()}
    lists = {n: t.tolist() for n, t in state.items()}
    padding = {n: t[B:].clone().to(DEV) for n, t in state.items()}
    for step in range(n_steps):
        sampled = torch.randint(0, 50000, (B,), device=DEV)
        advance_step(sampled, *(gpu[n] for n in names), block_size)
        advance_step_reference(sampled, *(ref[n] for n in names), block_size)
        advance_step_python(sampled.tolist(), *(lists[n] for n in names), block_size)
        for n in names:
            assert torch.equal(gpu[n], ref[n]), f"step {step}: {n} differs from the reference"
            assert gpu[n].tolist() == lists[n], f"step {step}: {n} differs from the row-by-row specification"
            assert torch.equal(gpu[n][B:], padding[n]), f"step {step}: padding rows of {n} were touched"
    assert (gpu["steps_left"][:B] == 0).all() and (gpu["slot_mapping"][:B] == -1).all()
    if B >= 3:
        assert gpu["positions"][2].item() == capacity + 1   # advanced past its table, but never wrote a slot


# ---- CUDA graphs (GPU only) ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_wrappers_capture_in_a_cuda_graph():
    """Every wrapper captured once, replayed on new data in the same buffers: no host reads, grids from shapes."""
    torch.manual_seed(9)
    dtype, T, D, I = torch.bfloat16, 64, 4096, 14336
    H, KVH, Dh = HEADS
    bufs = dict(x=torch.randn(T, D, device=DEV, dtype=dtype), res=torch.randn(T, D, device=DEV, dtype=dtype),
                w=torch.randn(D, device=DEV, dtype=dtype), q=torch.randn(T, H, Dh, device=DEV, dtype=dtype),
                k=torch.randn(T, KVH, Dh, device=DEV, dtype=dtype), pos=torch.randint(0, MAX_POS, (T,), device=DEV),
                gu=torch.randn(T, 2 * I, device=DEV, dtype=dtype))
    cos_sin = cos_sin_table(Dh)
    k_cache = torch.zeros(T, 16, KVH, Dh, device=DEV, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(T * 16, device=DEV)[:T]
    run = lambda: (rms_norm(bufs["x"], bufs["w"], EPS), add_rms_norm(bufs["x"], bufs["res"], bufs["w"], EPS),  # noqa
                   apply_rotary(bufs["q"], bufs["k"], bufs["pos"], cos_sin), silu_and_mul(bufs["gu"]),
                   write_kv(bufs["k"], bufs["k"], k_cache, v_cache, slots))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()                                           # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for name, t in bufs.items():                         # new data, same buffers
        t.copy_(torch.randint_like(t, 0, MAX_POS) if name == "pos" else torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    check(outs[0], rms_norm_reference(bufs["x"], bufs["w"], EPS), "graph rms_norm", bf16_min_exact=NORM_MIN_EXACT)
    check(outs[1][0], add_rms_norm_reference(bufs["x"], bufs["res"], bufs["w"], EPS)[0], "graph add_rms_norm",
          bf16_min_exact=NORM_MIN_EXACT)
    ref_q, ref_k = apply_rotary_reference(bufs["q"], bufs["k"], bufs["pos"], cos_sin)
    assert torch.equal(outs[2][0], ref_q) and torch.equal(outs[2][1], ref_k)
    check(outs[3], silu_and_mul_reference(bufs["gu"]), "graph silu_and_mul", bf16_min_exact=0.999)
    assert torch.equal(k_cache.view(-1, KVH, Dh)[slots], bufs["k"])


# ---- compiled for the H100 (no GPU needed) -------------------------------------------------------------------------
# Run in a fresh process: Triton 3.6's compiler fails in a process where the interpreter has run kernels.
_COMPILE_FOR_SM90 = r"""
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import activation, advance_step, kv_cache, norm, rotary

def ptx(fn, types, constexprs, aligned, num_warps, fp_fusion):
    signature = {n: types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}   # as the launcher infers
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion}).asm["ptx"]

bf = "*bf16"
out = {
    "add_rms_norm": ptx(norm._rms_norm_kernel, dict(x_ptr=bf, res_ptr=bf, w_ptr=bf, out_ptr=bf, sum_ptr=bf,
                        n_rows="i32", D="i32", inv_D="fp32", eps="fp32"), dict(HAS_RESIDUAL=True, BLOCK_M=1,
                        BLOCK_D=4096), ["x_ptr", "res_ptr", "w_ptr", "out_ptr", "sum_ptr", "D"], 8, False),
    "rotary": ptx(rotary._rotary_kernel, dict(q_ptr=bf, k_ptr=bf, q_out_ptr=bf, k_out_ptr=bf, pos_ptr="*i64",
                  cos_sin_ptr="*fp32", q_token_stride="i32", k_token_stride="i32", H="i32", KVH="i32"),
                  dict(HALF=64, BLOCK_HALF=64, BLOCK_HQ=32, BLOCK_HK=8), ["q_ptr", "k_ptr", "q_out_ptr",
                  "k_out_ptr", "pos_ptr", "cos_sin_ptr", "q_token_stride", "k_token_stride", "H", "KVH"], 4, False),
    "silu_and_mul": ptx(activation._silu_and_mul_kernel, dict(x_ptr=bf, out_ptr=bf, I="i32"),
                        dict(BLOCK_I=activation.BLOCK_I, PRECISE_EXP=True), ["x_ptr", "out_ptr", "I"], 4, False),
    "write_kv": ptx(kv_cache._write_kv_kernel, dict(k_ptr=bf, v_ptr=bf, k_cache_ptr=bf, v_cache_ptr=bf,
                    slot_ptr="*i64", k_token_stride="i32", v_token_stride="i32"), dict(ROW=1024, BLOCK_ROW=1024),
                    ["k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "slot_ptr", "k_token_stride",
                     "v_token_stride"], 4, True),
    "advance_step": ptx(advance_step._advance_step_kernel, dict(sampled_ptr="*i64", input_ids_ptr="*i64",
                        positions_ptr="*i64", seq_lens_ptr="*i32", slot_ptr="*i64", block_tables_ptr="*i32",
                        steps_left_ptr="*i32", B="i32", max_blocks="i32", block_table_stride="i32"),
                        dict(BLOCK_SIZE=16, BLOCK_B=advance_step.BLOCK_B), [], 4, True),
}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_kernels_compile_for_h100(tmp_path):
    """Each kernel compiles for sm_90 as its wrapper launches it at Llama-3-8B shapes (Triton's own ptxas, no GPU),
    with 16-byte global accesses on the bulk data, IEEE division where it matters, and no fused multiply-add in
    rotary (one would skip the bf16 rounding of a product: seen before fp fusion was turned off)."""
    import json
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(__file__), "..")
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, str(tmp_path / "ptx.json")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ptx = json.loads((tmp_path / "ptx.json").read_text())
    for name in ("add_rms_norm", "rotary", "silu_and_mul", "write_kv"):
        assert "ld.global.v4.b32" in ptx[name] and "st.global.v4.b32" in ptx[name], f"{name}: no 16-byte accesses"
    assert "fma.rn" not in ptx["rotary"], "rotary: a fused multiply-add skips the rounding of a product"
    import inspect
    for wrapper in (rms_norm, apply_rotary, silu_and_mul):     # the launches use the options compiled above
        assert "enable_fp_fusion=False" in inspect.getsource(wrapper) + inspect.getsource(_norm_launch)
    assert "div.rn.f32" in ptx["silu_and_mul"] and "div.full" not in ptx["silu_and_mul"], "silu: IEEE division"
    assert "div.full" not in ptx["add_rms_norm"], "rms_norm: an approximate division"
    assert "st.global" in ptx["advance_step"]
