"""Paged attention in Triton: decode (flash-decoding, GQA-aware) and prefill (flash-attention over the paged cache),
each beside its PyTorch reference.

Layout (engine/attention.py): k_cache, v_cache [num_blocks, page_size, KVH, D]; block_tables int32 [B, max_blocks]
(only the entries covering seq_len are read); seq_lens int32 [B], tokens in the cache INCLUDING this step's, whose
K/V are already written. H query heads share KVH kv heads in groups of G = H // KVH (query head h reads kv head h // G).

Decode: one query per sequence, at position seq_len - 1, attending to all seq_len tokens.
    grid (KVH, B, num_splits). A program loads each K/V tile of its kv head ONCE for all G query heads of the group
    and walks its share of the context in tiles of BLOCK_N tokens (several pages each; page ids gathered from the
    block table). Programs start in row order, a row's kv heads together (they read the same pages, 2 * D bytes
    apart), and a program runs about as long as its context: a long context started last runs on alone while the
    rest of the GPU idles, so callers put their longest contexts first (the model runner's decode steps do:
    longest-first list scheduling; in a mixed step the prefill's GEMMs dwarf it). Measured on an H200 (2026-12-02,
    D=128 and 64, 16-256 rows of w256-like contexts, graph-timed): 2-12% faster than the (B, KVH) grid in arrival
    order; the 8B's decode on w256 4.98 -> 4.92 s of GPU time.
    Online softmax in fp32, base 2. With num_splits > 1 each program writes a normalized partial output and its
    log-sum-exp to a workspace and a second, small kernel merges the splits. The grid depends only on (B, KVH,
    num_splits) and every length is read from seq_lens on the device, so the pair is CUDA-graph capturable; rows
    with seq_len == 0 (graph padding) come out as zeros, and an empty split's program returns at once.

Prefill: q [T, H, D] flat over B sequences; query i of sequence b sits at position seq_len_b - query_len_b + i and
    attends causally to cache positions 0..its own. grid (H // PACK, T // BLOCK_Q + B): a program takes PACK query
    heads of one kv group (the whole group where G is a power of two) and BLOCK_Q = BLOCK_M // PACK queries, its
    BLOCK_M rows the (query, head) pairs, so each K/V tile is gathered once for the pack. The program -> (sequence,
    query tile) map is computed on the device (a binary search over query_start_loc, see the kernel), so the host
    never reads the device. Fully visible KV tiles run without a mask, the diagonal ones with it, and tiles past the
    causal frontier are never visited. The single-query sequences of a mixed step (decode rows) are handed to the decode
    kernel in its varlen mode, which the prefill kernel then skips: a 1-query tile would waste most of its rows.

Performance intent (H100, bf16; Llama-3-8B: H=32, KVH=8, D=128, page 16). Not measured here (no GPU on the
development machine): `bench_attention()` below measures it.
  - Decode is memory-bound: ~4 FLOP per K/V byte, far under the H100's ~300 FLOP/byte balance. Each K/V byte is read
    once per kv head (GQA group folded into one program), along head_dim in contiguous 2*D-byte rows, which Triton
    turns into 16-byte vector loads (8 bf16 per thread). B=256 x KVH=8 = 2048 programs fill 132 SMs many times;
    small batches get flash-decoding splits (default_num_splits) so at least ~one program per SM is in flight.
    Tensor cores for the group's dot products (M = 16, padded), so the arithmetic stays off the critical path.
  - Prefill is compute-bound for long queries (8 x 1024-token causal prefill: ~400 FLOP per byte of q/k/v/out):
    tl.dot (wgmma on sm_90) on BLOCK_M x BLOCK_N = 64 x 32 tiles, 4 warps (one warpgroup), 4-stage software
    pipeline of the K/V gathers (cp.async; TMA cannot gather rows through a block table). Measured on an H200
    (2026-12-01, bf16, Llama-3-8B heads, page 16, medians of do_bench): 64 x 32 beat the 128 x 64 x 8-warp tile it
    replaced on every shape tried, most on the short prompts that serving prefills (a w256 step of 12 fresh
    prompts, 8,192 tokens: 232 against 296 us a layer, 220 TFLOP/s; 64 x 128-token prompts 103 against 158 us;
    8 x 1024: 263 against 306; 2 x 4096: 831 against 865; an 8,192-token chunk after 8,192 cached: 4.9 against
    5.3 ms): smaller query tiles waste less on the causal diagonal and on a short prompt's last tile, and a
    warpgroup per program leaves room for more programs per SM. (64 x 64 is 5% faster still past 4k tokens.)
    Packing the group's 4 heads into the 64 rows (16 queries x 4 heads, 2026-12-02, `.gpu/pack_probe.py`): w256
    steps 215 -> 195 and 207 -> 188 us a layer (239 TFLOP/s), 8 x 1024 265 -> 255, a mixed step 227 -> 217, a
    2048-token chunk after 6144 cached unchanged (785); 128-row tiles stayed slower (175-207 TFLOP/s on w256 steps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# ---- block sizes (named, chosen for the H100; see the module docstring and the kernels) -------------------------
# Checked offline with Triton's sm_90 compiler (no GPU needed: triton.compile(..., target=GPUTarget("cuda", 90, 32))):
# K/V gathers become 16-byte cp.async (cp.async.cg) once the strides are multiples of 16 elements (Triton
# specializes such integer arguments), prefill's tl.dot becomes wgmma, decode's (M = 16) mma.sync; no spills in bf16.
DECODE_NUM_WARPS = 4
# The decode tile, (KV tokens per tile, software-pipeline stages), by head size: see decode_tile(). The page-id load
# feeds the K/V loads' addresses, so the pipeline spends stages on that chain: at num_stages 3 or 4 Triton keeps ONE
# K/V buffer (a tile in flight only while none is being used), at 5 it keeps two. Memory-bound work wants the bytes
# in flight, but every buffer is shared memory that a program holds, and fewer programs fit on an SM.
DECODE_TILE = (128, 4)         # D=128 bf16: 64 KB of K+V a tile, one buffer: 3 programs per SM
DECODE_TILE_NARROW = (128, 5)  # D<=64: 32 KB a tile, two buffers (64 KB): 3 programs per SM
DECODE_TILE_WIDE = (32, 5)     # D=256 or fp32: wider tiles would cost registers (fp32 spills at 64 x 128)
DECODE_MIN_TILES_PER_SPLIT = 2   # a split smaller than this spends more on its prologue/epilogue than on its loads
DECODE_MAX_SPLITS = 32
MIN_GROUP_PAD = 16           # tl.dot needs M >= 16: the G query heads of a group are padded up to this

PREFILL_BLOCK_M = 64         # queries per tile: one warpgroup's wgmma of M=64 (see the module docstring)
PREFILL_BLOCK_N = 32         # KV tokens per tile
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor) -> tuple[int, int, int, int]:
    H, D = q.shape[1], q.shape[2]
    _, page_size, KVH, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % KVH == 0, f"{H} query heads are not a multiple of {KVH} kv heads"
    assert D & (D - 1) == 0 and 16 <= D <= 256, f"head_dim {D} must be a power of two in [16, 256]"
    assert page_size & (page_size - 1) == 0, f"block_size {page_size} must be a power of two"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert v_cache.stride() == k_cache.stride(), "k_cache and v_cache must share a layout"
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
    return H, KVH, D, page_size


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~3e-4 relative error); bf16/fp16 use the tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


# =================================================================================================================
# Decode
# =================================================================================================================

@triton.jit
def _split_tiles(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """(KV tiles of a context, tiles per split): how the decode kernel shares a context among its splits, and how
    the combine kernel finds the splits that wrote something. One definition, so the two always agree. A context
    of 0 tokens has no tiles: every share is empty."""
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    return num_tiles, tl.maximum(tl.cdiv(num_tiles, num_splits), 1)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2e, num_splits, num_heads,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: kv head kvh, sequence b, split s; all G query heads of the group at once.

    GQA with tl.dot, not a broadcast multiply-reduce: a [G, 1, D] x [1, BLOCK_N, D] product for G=4, BLOCK_N=64,
    D=128 is 32K fp32 values, 256 registers per thread at 4 warps (spills), so the broadcast form would need
    BLOCK_N ~ 16 and four times the loop trips, each with its own reductions. tl.dot pads the group to 16 rows
    (MMA needs M >= 16) and runs on the tensor cores: the padding costs MMA cycles, which decode has in excess
    (it is bound by the K/V bytes), and the same code serves G = 3 (SmolLM2) or any other group, padded rows
    being masked on the load of q and on the store.

    VARLEN: q and out are a flat mixed batch [T, H, D]; sequence b's query is row query_start_loc[b], and only
    sequences with exactly one query are done here (the prefill kernel does the others).
    """
    kvh = tl.program_id(0)       # fastest: a row's kv heads start together, rows in the caller's order
    b = tl.program_id(1)
    split = tl.program_id(2)

    if VARLEN:
        q_row = tl.load(query_start_loc_ptr + b)
        if tl.load(query_start_loc_ptr + b + 1) - q_row != 1:
            return
    else:
        q_row = b
    seq_len = tl.load(seq_lens_ptr + b)
    num_tiles, tiles_per_split = _split_tiles(seq_len, num_splits, BLOCK_N)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    if SPLIT:
        if tile_lo >= tile_hi:
            return      # empty share (short or padding row): the combine kernel knows not to read it

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)                                       # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)   # running max (base-2 logits)
    l_i = tl.zeros([GROUP_PAD], tl.float32)                 # running sum of exp2
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_ch
    v_head = v_cache_ptr + kvh * stride_ch
    # The first tile of a non-empty share always holds a valid token, so m_i is finite after it and the -inf
    # start never meets a fully masked row (no exp2(-inf - -inf)).
    for t in range(tile_lo, tile_hi):
        tok = t * BLOCK_N + offs_n                                                       # [BLOCK_N]
        tok_mask = tok < seq_len                       # only the last tile of a sequence is partial
        page = tl.load(bt_row + tok // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)  # one id per token (L1 hits)
        slot = page * stride_cb + (tok % PAGE_SIZE) * stride_cs                          # [BLOCK_N] int64
        # Rows of D contiguous elements: coalesced, 16-byte vectors along head_dim.
        k = tl.load(k_head + slot[:, None] + offs_d[None, :], mask=tok_mask[:, None], other=0.0)   # [BLOCK_N, D]
        v = tl.load(v_head + slot[:, None] + offs_d[None, :], mask=tok_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e         # [GROUP_PAD, BLOCK_N]
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # Normalized partial output and its log2-sum-exp2; l_i > 0 here (the share was not empty).
        row = (b * num_heads + heads) * num_splits + split                               # [GROUP_PAD]
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=g_mask[:, None])
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]             # seq_len == 0: acc == 0, so zeros, not NaN
        tl.store(out_ptr + q_row.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_combine_kernel(
    part_o_ptr, part_lse_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    num_splits, num_heads, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
):
    """One program per (sequence, query head): log-sum-exp merge of the non-empty splits.

    Which splits are non-empty comes from _split_tiles, as the decode kernel split the work, so the
    workspace (torch.empty) is never read where nothing wrote it."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if VARLEN:
        q_row = tl.load(query_start_loc_ptr + b)
        if tl.load(query_start_loc_ptr + b + 1) - q_row != 1:
            return
    else:
        q_row = b
    num_tiles, tiles_per_split = _split_tiles(tl.load(seq_lens_ptr + b), num_splits, BLOCK_N)
    num_valid = tl.cdiv(num_tiles, tiles_per_split)                 # 0 for a padding row

    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_valid
    row = (b * num_heads + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    lse_max = tl.where(num_valid > 0, tl.max(lse, 0), 0.0)
    w = tl.where(s_mask, tl.exp2(lse - lse_max), 0.0)                # [SPLITS_PAD]
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


def decode_tile(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(KV tokens per tile, pipeline stages) of the decode kernel for this head size and dtype.

    Measured on an H200 (2026-12-01, bf16, H=32, KVH=8, page 16, CUDA graphs; 256 rows of contexts U[128, 1536] and
    U[400, 900], 32 of U[600, 1200]; the previous tile was 64 x 5 for both): at D=128 (Llama-3-8B) 128 x 4 was
    0.7-1.6% faster on 256 rows and equal on 32, and took the 8B's decode GPU time on w256 from 5.08 to 5.01 s;
    128 x 5 was 3-9% slower (two 64 KB buffers: one program per SM). At D=64 (Llama-3.2-1B) 128 x 5 was 2.4-11.5%
    faster than 64 x 5, and 128 x 4 up to 6.7% slower on 32 rows (one buffer of a small tile: too few bytes in
    flight)."""
    if head_dim >= 256 or dtype == torch.float32:
        return DECODE_TILE_WIDE
    return DECODE_TILE_NARROW if head_dim <= 64 else DECODE_TILE


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, tile_tokens: int, num_sms: int = 132) -> int:
    """Flash-decoding splits: enough programs for about one per SM when B * KVH alone does not fill the GPU, but
    never so many that a split gets fewer than DECODE_MIN_TILES_PER_SPLIT tiles (of tile_tokens, decode_tile's
    first) of the longest context.

    Batch 1, KVH 8, 1024 tokens, tiles of 128: 8 programs alone would use 8 of 132 SMs; 8 tiles -> 4 splits.
    Under CUDA graphs pass the same value at capture and replay (e.g. computed from max_model_len): the kernels
    are correct for any value, and shares left empty by shorter contexts return at once.
    """
    programs = batch * num_kv_heads
    if programs <= 0 or programs >= num_sms:
        return 1
    wanted = triton.cdiv(num_sms, programs)
    by_tiles = max(1, triton.cdiv(max_seq_len, tile_tokens) // DECODE_MIN_TILES_PER_SPLIT)
    return max(1, min(wanted, by_tiles, DECODE_MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_splits: int = 1,
                           out: torch.Tensor | None = None, *, block_n: int | None = None,
                           num_stages: int | None = None,
                           query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] (one query per sequence, at position seq_len - 1) -> out [B, H, D].

    Never reads the device from the host: safe under CUDA-graph capture (the split workspace comes from torch.empty,
    which capture serves from the graph's private pool).

    With query_start_loc ([B + 1] int32), q and out are instead a flat mixed batch [T, H, D]: the rows of the
    sequences with exactly one query are computed and no other row is touched (paged_prefill_attention uses this
    for the decode rows of a mixed step)."""
    B = seq_lens.shape[0]
    H, KVH, D, page_size = _check_cache(q, k_cache, v_cache, block_tables, seq_lens)
    varlen = query_start_loc is not None
    if varlen:
        assert query_start_loc.dtype == torch.int32 and query_start_loc.shape[0] == B + 1
    else:
        assert q.shape[0] == B, (q.shape, seq_lens.shape)
    assert block_tables.shape[0] >= B
    assert 1 <= num_splits <= 128, "the combine kernel holds all splits of a head at once"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1 and out.dtype == q.dtype
    if B == 0:
        return out
    group = H // KVH
    tile_n, tile_stages = decode_tile(D, q.dtype)
    block_n, num_stages = block_n or tile_n, num_stages or tile_stages
    split = num_splits > 1
    if split:
        part_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out     # unused
    qsl = query_start_loc if varlen else seq_lens          # unused unless varlen
    _paged_decode_kernel[(KVH, B, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, qsl, out, part_o, part_lse,
        scale * LOG2E, num_splits, H,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(MIN_GROUP_PAD, _next_pow2(group)), HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_N=block_n, SPLIT=split, VARLEN=varlen, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=DECODE_NUM_WARPS, num_stages=num_stages,
    )
    if split:
        _decode_combine_kernel[(B, H)](
            part_o, part_lse, seq_lens, qsl, out, num_splits, H, out.stride(0), out.stride(1),
            HEAD_DIM=D, SPLITS_PAD=_next_pow2(num_splits), BLOCK_N=block_n, VARLEN=varlen, num_warps=4,
        )
    return out


def _gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, length: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of each row, [B, length, KVH, D] in dtype, zero past each row's seq_len (so that
    whatever sits in unused table entries or page slots is never read), and the validity mask [B, length]."""
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    valid = pos[None, :] < seq_lens[:, None].long()                                   # [B, length]
    pages = torch.where(valid, block_tables[:, pos // page_size].long(), 0)
    slots = pages * page_size + pos % page_size
    kv = cache.reshape(-1, *cache.shape[2:])[slots].to(dtype)                          # [B, length, KVH, D]
    return torch.where(valid[:, :, None, None], kv, 0), valid


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                     **_: object) -> torch.Tensor:
    """The oracle: gather the pages, softmax in fp32 (fp64 when given fp64). Rows with seq_len == 0 give zeros."""
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    length = int(seq_lens.max()) if B else 0
    if length == 0:
        return torch.zeros_like(q)
    k, valid = _gather_pages(k_cache, block_tables[:B], seq_lens, length, ct)
    v, _ = _gather_pages(v_cache, block_tables[:B], seq_lens, length, ct)
    qg = q.to(ct).view(B, KVH, H // KVH, D)
    s = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                   # an all-masked row (seq_len 0) -> zeros
    o = torch.einsum("bkgl,blkd->bkgd", p, v)
    return o.reshape(B, H, D).to(q.dtype)


# =================================================================================================================
# Prefill
# =================================================================================================================

@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale_log2e, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, PACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_DECODE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: PACK query heads of one kv group (PACK divides GROUP), one tile of BLOCK_Q = BLOCK_M // PACK
    queries of one sequence. The tile's BLOCK_M rows are (query, head) pairs, query-major: each K/V tile is loaded
    once for all PACK heads (the loads are the kernel's gathers through the block table), and a tile spans
    BLOCK_Q positions, so its causal diagonal is BLOCK_Q keys wide, not BLOCK_M.

    Program -> (sequence, tile) on the device: sequence b owns the tile indices starting at
    first(b) = query_start_loc[b] // BLOCK_Q + b. first(b+1) - first(b) >= cdiv(query_len_b, BLOCK_Q) and is at
    least 1, so the indices are strictly increasing, every tile has a slot, and the total is
    T // BLOCK_Q + B, known on the host from q's shape alone. A program finds its b by binary search over
    query_start_loc (log2 B scalar loads, L2 hits) and returns at once when its slot is past its sequence's last
    tile (at most B such programs). This needs no host-built table, no host<->device traffic and no sync, and a
    mixed batch of one long prefill and many 1-token rows gets exactly the tiles it needs (a grid of
    B * cdiv(max_query_len, BLOCK_Q) would launch ~B times too many programs there).

    Head packs are grid axis 0 (fastest in launch order): the packs that share a kv head, and all heads of one
    query tile, run side by side, so the reads of each K/V tile after the first hit L2. Tiles are launched last
    first: a sequence's later query tiles see more keys, and starting the longest work first shortens the tail
    of the last wave.
    """
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK
    first_head = tl.program_id(0) * PACK
    pid = tl.num_programs(1) - 1 - tl.program_id(1)

    lo = 0                  # largest b with first(b) <= pid lies in [lo, hi)
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid)
    b = lo
    q_begin = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_begin
    m_start = (pid - (q_begin // BLOCK_Q + b)) * BLOCK_Q
    if m_start >= q_len:
        return
    if SKIP_DECODE_ROWS:
        if q_len == 1:
            return          # done by the decode kernel (see paged_prefill_attention)
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len                    # tokens cached before this step's queries

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m_start + offs_r // PACK                      # row r: query m_start + r // PACK ...
    heads = first_head + offs_r % PACK                     # ... of head first_head + r % PACK
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    q_rows = (q_begin + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)                                          # [BLOCK_M, D]
    q_pos = ctx_len + offs_m          # each query's position; padding rows (>= q_len) are past seq_len, never stored

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + (first_head // GROUP) * stride_ch
    v_head = v_cache_ptr + (first_head // GROUP) * stride_ch

    # Keys 0 .. ctx_len + m_start are visible to every query of the tile: those whole tiles run unmasked.
    # Every row sees key 0, in the first tile visited, so m_i is finite from then on (no exp2(-inf - -inf)).
    full_end = (ctx_len + m_start + 1) // BLOCK_N * BLOCK_N
    for n in range(0, full_end, BLOCK_N):
        tok = n + offs_n
        page = tl.load(bt_row + tok // PAGE_SIZE).to(tl.int64)
        slot = page * stride_cb + (tok % PAGE_SIZE) * stride_cs
        k = tl.load(k_head + slot[:, None] + offs_d[None, :])                             # [BLOCK_N, D]
        v = tl.load(v_head + slot[:, None] + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e         # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # The diagonal: tiles up to the tile's last query position, causal mask; nothing past it is visited.
    kv_end = tl.minimum(ctx_len + m_start + BLOCK_Q, seq_len)
    for n in range(full_end, kv_end, BLOCK_N):
        tok = n + offs_n
        tok_mask = tok < kv_end
        page = tl.load(bt_row + tok // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
        slot = page * stride_cb + (tok % PAGE_SIZE) * stride_cs
        k = tl.load(k_head + slot[:, None] + offs_d[None, :], mask=tok_mask[:, None], other=0.0)
        v = tl.load(v_head + slot[:, None] + offs_d[None, :], mask=tok_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        s = tl.where((tok[None, :] <= q_pos[:, None]) & tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def _prefill_config(head_dim: int, dtype: torch.dtype, group: int, max_query_len: int, block_m: int | None,
                    block_n: int | None, pack: int | None) -> tuple[int, int, int, int, int]:
    """(rows a tile, KV tokens a tile, query heads a program, warps, stages)."""
    if pack is None:
        # The group's heads share a program when G is a power of two and leaves a query tile of 8 or more.
        pack = group if group & (group - 1) == 0 and (block_m or PREFILL_BLOCK_M) // group >= 8 else 1
    assert group % pack == 0
    if block_m is None:
        # Short queries only (e.g. a batch of small chunks): shrink the query tile instead of padding it.
        block_m = max(16, min(PREFILL_BLOCK_M, pack * _next_pow2(max(1, max_query_len))))
    assert block_m % pack == 0
    block_n = block_n or PREFILL_BLOCK_N
    # 8 warps for a 128-row tile (two wgmma warpgroups) and for D=256 (the 64 x 256 fp32 accumulator would need
    # 128+ registers a thread at 4 warps).
    num_warps = 8 if block_m >= 128 or (head_dim >= 256 and dtype != torch.float32) else PREFILL_NUM_WARPS
    # Shared memory holds num_stages K and V tiles: fp32 tiles are twice as large, D=256 ones too.
    num_stages = 2 if head_dim > 128 else 3 if dtype == torch.float32 else PREFILL_NUM_STAGES
    return block_m, block_n, pack, num_warps, num_stages


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, max_query_len: int, out: torch.Tensor | None = None, *,
                            block_m: int | None = None, block_n: int | None = None, pack: int | None = None,
                            route_decode_rows: bool = True) -> torch.Tensor:
    """q [T, H, D], flat over B sequences (rows query_start_loc[b]:query_start_loc[b+1]) -> out [T, H, D].

    max_query_len (a host int) only picks the query tile; nothing is read back from the device.

    route_decode_rows: the sequences with a single query (the decode rows of a mixed step) go to the decode
    kernel (varlen mode: one program per (sequence, kv head), the G heads sharing each K/V tile, M = 16 MMAs),
    the others to the prefill kernel, which skips the single-query ones; both decide on the device, so this is
    two launches and no host work. Without it, each decode row would cost H programs of a BLOCK_M-row tile with
    one live row: in a step of 4 x 384-token chunks plus 128 decode rows (contexts ~800) that padding is ~8x the
    useful FLOPs of the step. With max_query_len == 1 only the decode kernel runs."""
    T = q.shape[0]
    H, KVH, D, page_size = _check_cache(q, k_cache, v_cache, block_tables, seq_lens)
    B = seq_lens.shape[0]
    assert query_start_loc.dtype == torch.int32 and query_start_loc.shape[0] == B + 1
    assert query_start_loc.is_contiguous() and block_tables.shape[0] >= B
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    assert out.shape == (T, H, D) and out.stride(-1) == 1 and out.dtype == q.dtype
    if T == 0 or B == 0:
        return out
    if route_decode_rows:
        paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, 1, out=out,
                               query_start_loc=query_start_loc)
        if max_query_len <= 1:
            return out
    block_m, block_n, pack, num_warps, num_stages = _prefill_config(D, q.dtype, H // KVH, max_query_len, block_m,
                                                                    block_n, pack)
    grid = (H // pack, T // (block_m // pack) + B)
    assert grid[1] <= 65535, "too many query tiles for grid axis 1"
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * LOG2E, B,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=H // KVH, HEAD_DIM=D, PAGE_SIZE=page_size, PACK=pack, BLOCK_M=block_m, BLOCK_N=block_n,
        SKIP_DECODE_ROWS=route_decode_rows, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                      seq_lens: torch.Tensor, scale: float, max_query_len: int = 0,
                                      **_: object) -> torch.Tensor:
    """The oracle, one sequence at a time: gather its pages, causal mask, softmax in fp32 (fp64 when given fp64)."""
    T, H, D = q.shape
    KVH = k_cache.shape[2]
    G = H // KVH
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, L in enumerate(lens):
        s0, n = starts[b], starts[b + 1] - starts[b]
        if n == 0:
            continue
        k, _ = _gather_pages(k_cache, block_tables[b:b + 1], seq_lens[b:b + 1], L, ct)
        v, _ = _gather_pages(v_cache, block_tables[b:b + 1], seq_lens[b:b + 1], L, ct)
        k = k[0].repeat_interleave(G, dim=1)                                              # [L, H, D]
        v = v[0].repeat_interleave(G, dim=1)
        qb = q[s0:s0 + n].to(ct)                                                          # [n, H, D]
        s = torch.einsum("nhd,lhd->hnl", qb, k) * scale
        visible = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)       # query i at L - n + i
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        out[s0:s0 + n] = torch.einsum("hnl,lhd->nhd", p, v).to(q.dtype)
    return out


# =================================================================================================================
# Benchmark (run on the GPU: python -c "from kernels.attention import bench_attention; bench_attention()")
# =================================================================================================================

def _bench_cache(seq_lens: list[int], num_kv_heads: int, head_dim: int, page_size: int, dtype, device,
                 generator: torch.Generator):
    """A KV cache holding exactly these sequences, pages shuffled, plus its block table."""
    pages_per_seq = [triton.cdiv(L, page_size) for L in seq_lens]
    num_pages = max(1, sum(pages_per_seq))
    perm = torch.randperm(num_pages, generator=generator).to(torch.int32)
    width = max(1, max(pages_per_seq))
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[at:at + n]
        at += n
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype).to(device)
    v = torch.randn(shape, generator=generator).to(dtype).to(device)
    return k, v, table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)


def bench_attention(num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128, page_size: int = 16,
                    dtype: torch.dtype = torch.bfloat16, decode_batches: dict[str, list[int]] | None = None,
                    prefill_batches: dict[str, list[tuple[int, int]]] | None = None, device: str = "cuda") -> None:
    """Times both kernels at Llama-3-8B shapes next to the PyTorch reference, on the GPU; prints tables.

    First the two ceilings, measured: a 1 GiB device-to-device copy (read + write bytes) and a bf16 8192^3 matmul.
    Decode: K/V + q + out bytes over time (GB/s). 'eager' is triton.testing.do_bench (median, L2 flushed before
    each call, launch overhead included); 'graph' is do_bench_cudagraph (median; back-to-back replays as the
    engine runs decode, rotating over enough input copies to overflow the 50 MB L2). A few splits with the default
    tile, then a few tiles (tokens x stages) with the default splits; * marks the defaults. Prefill: causal FLOPs
    (4 * D per visible (query, key) pair per head) over time (TFLOP/s), for a few tile shapes; * marks the default.
    decode_batches: name -> context lengths; prefill_batches: name -> (query_len, seq_len) per sequence."""
    import itertools
    import random

    from triton.testing import do_bench, do_bench_cudagraph
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    mixed = [rng.randint(128, 1536) for _ in range(256)]
    decode_batches = decode_batches or {"B=256 ctx U[128,1536]": mixed,
                                        "the same, longest first": sorted(mixed, reverse=True),   # as the engine
                                        "B=64 ctx U[128,1536]": [rng.randint(128, 1536) for _ in range(64)],
                                        "B=1 ctx 512": [512]}
    prefill_batches = prefill_batches or {
        "8 x 1024 new tokens": [(1024, 1024)] * 8,
        "mixed: 4 x 384 after 0..1536 + 128 decodes": [(384, 384 + c) for c in (0, 512, 1024, 1536)]
                                                      + [(1, rng.randint(128, 1536)) for _ in range(128)]}
    scale = head_dim ** -0.5
    esize = torch.empty(0, dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name(0)} ({num_sms} SMs): H={num_heads} KVH={num_kv_heads} D={head_dim} "
          f"page={page_size} {dtype}")

    def median(fn) -> float:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    def rotating(fns):
        state = {"i": 0}

        def run():
            fns[state["i"] % len(fns)]()
            state["i"] += 1
        return run

    buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    t = median(lambda: buf.clone())
    print(f"ceilings: copy {2 * buf.numel() / t * 1e-6:.0f} GB/s", end="")
    del buf
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = median(lambda: a @ a)
    print(f", bf16 matmul {2 * 8192 ** 3 / t * 1e-9:.0f} TFLOP/s")
    del a

    print(f"{'decode':24s} {'splits':>6s} {'tile':>7s} {'eager ms':>9s} {'graph ms':>9s} {'GB/s':>7s} "
          f"{'torch ms':>9s} {'x torch':>7s}")
    tile = decode_tile(head_dim, dtype)
    other_tiles = sorted({(64, 5), (128, 4), (128, 5)} - {tile})
    for name, lens in decode_batches.items():
        B = len(lens)
        bytes_moved = 2 * sum(lens) * num_kv_heads * head_dim * esize + 2 * B * num_heads * head_dim * esize
        sets = []
        for _ in range(max(1, min(32, triton.cdiv(200 << 20, bytes_moved)))):
            k, v, table, sl = _bench_cache(lens, num_kv_heads, head_dim, page_size, dtype, device, gen)
            q = torch.randn(B, num_heads, head_dim, generator=gen).to(dtype).to(device)
            sets.append((q, k, v, table, sl, torch.empty_like(q)))
        q, k, v, table, sl, _ = sets[0]
        t_ref = median(lambda: paged_decode_attention_reference(q, k, v, table, sl, scale))
        default = default_num_splits(B, num_kv_heads, max(lens), tile[0], num_sms)
        graph_splits = default_num_splits(B, num_kv_heads, 4096, tile[0], num_sms)  # as captured for max_model_len 4096
        splits_list = sorted({1, default, 2 * default, max(1, default // 2), graph_splits})
        for splits, (tokens, stages) in [(n, tile) for n in splits_list] + [(default, t) for t in other_tiles]:
            fns = [lambda s=s, n=splits, bn=tokens, st=stages: paged_decode_attention(
                s[0], s[1], s[2], s[3], s[4], scale, n, out=s[5], block_n=bn, num_stages=st) for s in sets]
            t_eager = median(fns[0])
            t_graph = do_bench_cudagraph(rotating(fns), rep=100, return_mode="median")
            mark = "*" if splits == default and (tokens, stages) == tile else " "
            print(f"{name:24s} {splits:>5d}{mark} {f'{tokens}x{stages}':>7s} {t_eager:9.4f} {t_graph:9.4f} "
                  f"{bytes_moved / t_graph * 1e-6:7.0f} {t_ref:9.3f} {t_ref / t_graph:6.1f}x")
        del sets, q, k, v, table, sl

    print(f"{'prefill':40s} {'tile':>16s} {'ms':>8s} {'TFLOP/s':>8s} {'torch ms':>9s} {'x torch':>7s}")
    for name, pairs in prefill_batches.items():
        qlens, lens = [p[0] for p in pairs], [p[1] for p in pairs]
        k, v, table, sl = _bench_cache(lens, num_kv_heads, head_dim, page_size, dtype, device, gen)
        T = sum(qlens)
        q = torch.randn(T, num_heads, head_dim, generator=gen).to(dtype).to(device)
        qsl = torch.tensor([0] + list(itertools.accumulate(qlens)), dtype=torch.int32, device=device)
        flops = sum(4 * head_dim * num_heads * (n * (L - n) + n * (n + 1) // 2) for n, L in pairs)
        out = torch.empty_like(q)
        t_ref = median(lambda: paged_prefill_attention_reference(q, k, v, table, qsl, sl, scale))
        default = _prefill_config(head_dim, dtype, num_heads // num_kv_heads, max(qlens), None, None, None)[:3]
        pack = default[2]
        # (rows, KV tokens, heads a program, route decode rows): the default first, then one head a program, then
        # other tiles.
        configs = [(*default, True), (default[0], default[1], 1, True), (128, 64, pack, True), (128, 32, pack, True),
                   (64, 64, pack, True)]
        if 1 in qlens:
            configs.append((*default, False))        # decode rows left in the prefill kernel
        for bm, bn, pk, route in configs:
            t = median(lambda: paged_prefill_attention(q, k, v, table, qsl, sl, scale, max(qlens), out=out,
                                                       block_m=bm, block_n=bn, pack=pk, route_decode_rows=route))
            mark = "*" if (bm, bn, pk, route) == (*default, True) else " "
            label = f"{bm}x{bn}/{pk}{'' if route else ' unrouted'}"
            print(f"{name:40s} {label:>15s}{mark} {t:8.4f} {flops / t * 1e-9:8.1f} {t_ref:9.3f} "
                  f"{t_ref / t:6.1f}x")
