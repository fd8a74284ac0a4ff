"""The paged attention kernels (kernels/attention.py) against their PyTorch references, and the references against
the engine's TorchAttention (the semantics they implement).

Without CUDA the kernels run under Triton's interpreter at tiny sizes with small tiles (so several tiles, splits
and query tiles are still crossed); with CUDA the same tests run at Llama-3-8B sizes (32/8 heads of 128, contexts up
to 2048, B up to 256, bf16) with the production tile sizes, plus a CUDA-graph capture/replay test.

Every input is a fresh random draw (the seed is in each failure message; PAGESTREAM_TEST_SEED=n replays it). Block
tables are shuffled, non-contiguous pages; every table entry past a row's pages points at a page of NaNs, and the
slots of a row's last page past its seq_len hold NaN, so a kernel that reads anything it should not gets NaN out.
Outputs are poisoned with NaN before the call, so an element never written fails. Errors are relative,
||out - ref|| / ||ref||, against a float64 reference (float32 for 16-bit inputs on the GPU, where it is ~1e-6 off):
whole tensor under 1e-5 (fp32), 3e-3 (fp16), 1e-2 (bf16), and each (token, head) row under three times that, so a
single wrong row (relative error ~1) cannot hide in the average.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before kernels.attention's @triton.jit runs

import triton                                          # noqa: E402

from engine.attention import AttentionMetadata, TorchAttention                              # noqa: E402
from kernels.attention import (DECODE_MAX_SPLITS, DECODE_MIN_TILES_PER_SPLIT,  # noqa: E402
                               PREFILL_BLOCK_M, PREFILL_BLOCK_N, decode_tile,
                               default_num_splits, paged_decode_attention, paged_decode_attention_reference,
                               paged_prefill_attention, paged_prefill_attention_reference)

DEV = "cuda" if ON_GPU else "cpu"
INTERPRET = bool(triton.knobs.runtime.interpret)
pytestmark = pytest.mark.skipif(not ON_GPU and not INTERPRET, reason="no GPU, and TRITON_INTERPRET is off")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {FP32: 1e-5, FP16: 3e-3, BF16: 1e-2}
ROW_FACTOR = 3


# ---- helpers ------------------------------------------------------------------------------------------------------
def fresh_seed() -> int:
    return int(os.environ.get("PAGESTREAM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if (not ON_GPU or dtype == FP32) else torch.float32


@dataclass
class PagedCache:
    k: torch.Tensor             # [num_pages, page, KVH, D]
    v: torch.Tensor
    block_tables: torch.Tensor  # [B, width] int32
    seq_lens: torch.Tensor      # [B] int32


def make_paged_cache(lens: list[int], kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
                     rng: random.Random, poison: bool = True) -> PagedCache:
    """Random K/V for sequences of these lengths on shuffled pages; NaN wherever nothing should be read (unless
    poison=False: the engine's TorchAttention reads, and masks, a little past short decode rows)."""
    need = [triton.cdiv(n, page) for n in lens]
    pages = list(range(sum(need) + 2))                       # two spare pages: NaN, or stale data
    rng.shuffle(pages)
    used, nan_pages = pages[:sum(need)], pages[sum(need):]
    width = max(need + [0]) + 2                              # every row has padding entries after its pages
    table = [[rng.choice(nan_pages) for _ in range(width)] for _ in lens]
    at = 0
    for b, n in enumerate(need):
        table[b][:n] = used[at:at + n]
        at += n
    shape = (len(pages), page, kv_heads, head_dim)
    k = torch.randn(shape, device=DEV, dtype=torch.float32).to(dtype)
    v = torch.randn(shape, device=DEV, dtype=torch.float32).to(dtype)
    for cache in (k, v) if poison else ():
        cache[nan_pages] = float("nan")
        for b, n in enumerate(lens):
            if n % page:
                cache[table[b][n // page], n % page:] = float("nan")     # the last page's unused slots
    return PagedCache(k, v, torch.tensor(table, dtype=torch.int32, device=DEV),
                      torch.tensor(lens, dtype=torch.int32, device=DEV))


def strided_queries(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """q as the model makes it: a view into a fused qkv projection (row stride (H + 2 KVH) * D)."""
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=DEV, dtype=torch.float32).to(dtype)
    return qkv[:, :heads]


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, zero_rows=None) -> None:
    """out [N, H, D] against ref [N, H, D] (higher precision). zero_rows: rows that must be exactly 0."""
    assert out.shape == ref.shape, what
    nan = torch.isnan(out)
    assert not nan.any(), f"{what}: {int(nan.sum())} elements NaN (never written, or read poison)"
    if zero_rows is not None and zero_rows.any():
        assert (out[zero_rows] == 0).all(), f"{what}: rows with seq_len 0 are not zeros"
    o, r = out.double(), ref.double()
    live = r.flatten(1).norm(dim=1) > 0
    err = ((o - r).norm() / r.norm()).item() if live.any() else 0.0
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e}"
    row_err = (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30)           # [N, H]
    row_err = row_err[live]
    if row_err.numel():
        worst = row_err.max().item()
        where = (row_err == row_err.max()).nonzero()[0].tolist()
        assert worst < ROW_FACTOR * TOL[dtype], f"{what}: row {where} relative error {worst:.2e}"


# ---- decode -----------------------------------------------------------------------------------------------------
@dataclass
class DecodeCase:
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    page: int
    batch: int
    max_len: int
    num_splits: int | None      # None: default_num_splits
    block_n: int | None = None  # None: the production tile

    def __str__(self):
        return (f"{str(self.dtype)[6:]}-H{self.heads}/{self.kv_heads}-D{self.head_dim}-page{self.page}-B{self.batch}"
                f"-L{self.max_len}-splits{self.num_splits or 'auto'}-bn{self.block_n or 'def'}")


if ON_GPU:
    DECODE_CASES = [
        DecodeCase(BF16, 32, 8, 128, 16, 256, 2048, 1),          # Llama-3-8B, big batch
        DecodeCase(BF16, 32, 8, 128, 16, 3, 2048, None),         # small batch: default splits (several)
        DecodeCase(BF16, 32, 8, 128, 32, 64, 1536, 4),
        DecodeCase(BF16, 32, 8, 128, 8, 17, 700, 13),            # many splits, many empty shares
        DecodeCase(BF16, 32, 8, 64, 16, 256, 2048, 1),           # Llama-3.2-1B (the D=64 tile)
        DecodeCase(BF16, 32, 8, 64, 16, 5, 2048, None),
        DecodeCase(BF16, 9, 3, 64, 16, 128, 2048, 1),            # SmolLM2: G = 3
        DecodeCase(BF16, 9, 3, 64, 16, 1, 512, None),
        DecodeCase(BF16, 8, 8, 128, 16, 64, 1024, 2),            # G = 1
        DecodeCase(BF16, 16, 2, 256, 16, 8, 1024, 3),            # D = 256 (smaller tile)
        DecodeCase(FP16, 12, 3, 16, 8, 32, 1024, 5),             # G = 4, D = 16
        DecodeCase(FP16, 32, 8, 128, 16, 48, 2048, 1),
        DecodeCase(FP32, 32, 8, 128, 16, 32, 1024, 1),
        DecodeCase(FP32, 9, 3, 64, 8, 16, 1024, 3),
    ]
else:
    DECODE_CASES = [                                             # dtype x group, with D, page, splits, tile varied
        DecodeCase(FP32, 4, 4, 16, 8, 6, 70, 1, 16),
        DecodeCase(FP32, 6, 2, 64, 16, 5, 70, 3, 32),
        DecodeCase(FP32, 8, 2, 16, 32, 5, 70, 2, 16),            # a page (32) larger than the tile (16)
        DecodeCase(BF16, 4, 4, 64, 16, 5, 70, 4, 16),
        DecodeCase(BF16, 6, 2, 16, 8, 6, 70, 1, 32),
        DecodeCase(BF16, 8, 2, 64, 16, 5, 70, 2, 16),
        DecodeCase(FP16, 4, 4, 16, 16, 5, 70, 1, 16),
        DecodeCase(FP16, 6, 2, 64, 8, 5, 70, 5, 16),
        DecodeCase(FP16, 8, 2, 16, 8, 5, 140, 1, None),          # the production tile (decode_tile)
        DecodeCase(BF16, 4, 2, 128, 16, 3, 300, 2, None),
    ]


def decode_lengths(batch: int, max_len: int, page: int, block_n: int, rng: random.Random) -> list[int]:
    """Padding rows (0), 1, exact multiples of the page and of the tile, one past them, the maximum, random."""
    special = [0, 1, page, 2 * page, block_n, block_n + 1, max_len][batch < 2:]     # a lone row is never padding
    lens = [rng.randint(1, max_len) for _ in range(batch)]
    for i, n in enumerate(rng.sample(special, min(len(special), batch))):
        lens[i] = min(n, max_len)
    if batch >= 2 and 0 not in lens:
        lens[1] = 0
    rng.shuffle(lens)
    return lens


def run_decode(case: DecodeCase, lens: list[int], num_splits: int, seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cache = make_paged_cache(lens, case.kv_heads, case.head_dim, case.page, case.dtype, rng)
    q = strided_queries(len(lens), case.heads, case.kv_heads, case.head_dim, case.dtype)
    scale = case.head_dim ** -0.5
    out = torch.full((len(lens), case.heads, case.head_dim), float("nan"), device=DEV, dtype=case.dtype)
    got = paged_decode_attention(q, cache.k, cache.v, cache.block_tables, cache.seq_lens, scale, num_splits,
                                 out=out, block_n=case.block_n)
    assert got is out
    rd = ref_dtype(case.dtype)
    ref = paged_decode_attention_reference(q.to(rd), cache.k.to(rd), cache.v.to(rd), cache.block_tables,
                                           cache.seq_lens, scale)
    return out, ref, cache.seq_lens == 0


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_paged_decode_matches_reference(case: DecodeCase):
    seed = fresh_seed()
    rng = random.Random(seed + 1)
    tile = case.block_n or decode_tile(case.head_dim, case.dtype)[0]
    lens = decode_lengths(case.batch, case.max_len, case.page, tile, rng)
    splits = case.num_splits or default_num_splits(case.batch, case.kv_heads, case.max_len, tile)
    if case.num_splits is None and case.batch * case.kv_heads < 132:
        assert splits > 1
    out, ref, zero_rows = run_decode(case, lens, splits, seed)
    check(out, ref, case.dtype, f"decode {case} splits={splits} seed={seed} lens={lens[:16]}", zero_rows)


def test_paged_decode_empty_shares_and_padding_rows():
    """More splits than tiles: most shares are empty and must contribute nothing; padding rows give zeros; a batch
    of padding rows only gives all zeros; every split count gives the same answer as one split."""
    seed = fresh_seed()
    big = ON_GPU
    case = DecodeCase(BF16 if big else FP32, 32 if big else 6, 8 if big else 2, 128 if big else 16, 16 if big else 8,
                      0, 0, None, None if big else 16)
    tile = case.block_n or decode_tile(case.head_dim, case.dtype)[0]
    lens = [0, 1, 0, tile + 1, 2 * tile, 3, 0, tile - 1]
    outs = []
    for splits in (1, 2, 3, 8, 16):
        out, ref, zero_rows = run_decode(case, lens, splits, seed)
        check(out, ref, case.dtype, f"splits={splits} seed={seed}", zero_rows)
        outs.append(out)
    for splits, out in zip((2, 3, 8, 16), outs[1:]):
        diff = (out.double() - outs[0].double()).norm() / outs[0].double().norm()
        assert diff < TOL[case.dtype], f"splits={splits} differs from splits=1 by {diff:.2e} (seed={seed})"
    out, ref, zero_rows = run_decode(case, [0, 0, 0], 4, seed)
    assert torch.equal(out, torch.zeros_like(out)) and zero_rows.all()


@pytest.mark.parametrize("tile", [32, 64, 128])
def test_default_num_splits(tile: int):
    assert default_num_splits(1, 8, 8 * tile, tile) >= 3          # batch 1, 8 tiles: several splits
    assert default_num_splits(256, 8, 2048, tile) == 1            # B * KVH = 2048 programs already fill 132 SMs
    assert default_num_splits(17, 8, 4096, tile) == 1             # 136 >= 132
    assert default_num_splits(1, 8, tile, tile) == 1              # one tile: nothing to split
    assert default_num_splits(0, 8, 512, tile) == 1
    for batch in (1, 2, 3, 5, 8, 16):
        for kv_heads in (1, 3, 8):
            for max_len in (1, tile - 1, tile, tile + 1, 200, 512, 1536, 4096, 32768, 131072):
                s = default_num_splits(batch, kv_heads, max_len, tile)
                tiles = triton.cdiv(max_len, tile)
                assert 1 <= s <= DECODE_MAX_SPLITS
                if s > 1:      # every split of the longest row has at least the minimum of tiles
                    assert tiles // s >= DECODE_MIN_TILES_PER_SPLIT, (batch, kv_heads, max_len, s)
                    assert batch * kv_heads * (s - 1) < 132             # no more programs than needed
                if tiles >= DECODE_MIN_TILES_PER_SPLIT * DECODE_MAX_SPLITS:
                    assert batch * kv_heads * s >= min(132, batch * kv_heads * DECODE_MAX_SPLITS)


# ---- prefill ----------------------------------------------------------------------------------------------------
@dataclass
class PrefillCase:
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    page: int
    scale_len: int              # lengths are drawn relative to this (about two query tiles on the CPU)
    block_m: int | None = None  # None: the production tiles
    block_n: int | None = None
    route: bool = True          # single-query rows to the decode kernel (False: the prefill kernel does them)
    pack: int | None = None     # query heads a program (None: the production choice)

    def __str__(self):
        return (f"{str(self.dtype)[6:]}-H{self.heads}/{self.kv_heads}-D{self.head_dim}-page{self.page}"
                f"-n{self.scale_len}-bm{self.block_m or 'def'}-bn{self.block_n or 'def'}"
                f"{'' if self.route else '-unrouted'}{f'-pack{self.pack}' if self.pack else ''}")


if ON_GPU:
    PREFILL_CASES = [
        PrefillCase(BF16, 32, 8, 128, 16, 1024),                 # Llama-3-8B
        PrefillCase(BF16, 32, 8, 128, 32, 300),
        PrefillCase(BF16, 9, 3, 64, 16, 1024),                   # SmolLM2
        PrefillCase(BF16, 8, 8, 128, 8, 500),                    # G = 1
        PrefillCase(BF16, 32, 8, 128, 16, 1024, route=False),   # decode rows through the prefill kernel
        PrefillCase(BF16, 16, 2, 256, 16, 400),                  # D = 256
        PrefillCase(FP16, 12, 3, 16, 16, 700),
        PrefillCase(FP32, 32, 8, 128, 16, 300),
        PrefillCase(BF16, 32, 8, 128, 16, 100, 16, 16),          # small tiles on the GPU too
        PrefillCase(BF16, 32, 8, 128, 16, 1024, pack=1),         # one head a program
        PrefillCase(BF16, 32, 8, 128, 16, 1024, 128, 64, pack=2),  # half a group a program
    ]
else:
    PREFILL_CASES = [
        PrefillCase(FP32, 4, 4, 16, 8, 24, 16, 16),
        PrefillCase(FP32, 6, 2, 64, 16, 24, 16, 32, route=False),
        PrefillCase(FP32, 8, 2, 16, 32, 40, 32, 16),
        PrefillCase(BF16, 4, 4, 64, 8, 24, 16, 16, route=False),
        PrefillCase(BF16, 6, 2, 16, 16, 40, 32, 32),
        PrefillCase(BF16, 8, 2, 64, 16, 24),                     # the production tile selection
        PrefillCase(FP16, 4, 4, 16, 16, 24, 16, 16),
        PrefillCase(FP16, 6, 2, 64, 8, 24, 16, 16, route=False),
        PrefillCase(FP16, 8, 2, 16, 8, 40),
        PrefillCase(FP32, 8, 2, 16, 16, 24, 16, 16, pack=1),     # one head a program
        PrefillCase(BF16, 8, 2, 64, 8, 40, 32, 16, pack=2),      # half a group a program
    ]


def prefill_batch(n: int, page: int, rng: random.Random) -> list[tuple[int, int]]:
    """(query_len, seq_len) per sequence: decode rows mixed in (1 token, with and without context), plain prefills,
    chunked continuations (query_len < seq_len), tile- and page-aligned lengths; shuffled."""
    seqs = [(1, 1), (1, rng.randint(2, 2 * n)),
            (q := rng.randint(n // 2, 2 * n), q),                                    # plain prefill
            (q := rng.randint(2, n), q + rng.randint(1, 2 * n)),                     # chunk after earlier chunks
            (n, n + page * rng.randint(1, 3)),                                       # aligned chunk
            (q := rng.randint(1, n), q + rng.randint(0, n))]
    rng.shuffle(seqs)
    return seqs


def run_prefill(case: PrefillCase, seqs: list[tuple[int, int]], seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    qlens, lens = [s[0] for s in seqs], [s[1] for s in seqs]
    cache = make_paged_cache(lens, case.kv_heads, case.head_dim, case.page, case.dtype, rng)
    T = sum(qlens)
    q = strided_queries(T, case.heads, case.kv_heads, case.head_dim, case.dtype)
    qsl = torch.tensor(np.cumsum([0] + qlens).tolist(), dtype=torch.int32, device=DEV)
    scale = case.head_dim ** -0.5
    out = torch.full((T, case.heads, case.head_dim), float("nan"), device=DEV, dtype=case.dtype)
    got = paged_prefill_attention(q, cache.k, cache.v, cache.block_tables, qsl, cache.seq_lens, scale, max(qlens),
                                  out=out, block_m=case.block_m, block_n=case.block_n, pack=case.pack,
                                  route_decode_rows=case.route)
    assert got is out
    rd = ref_dtype(case.dtype)
    ref = paged_prefill_attention_reference(q.to(rd), cache.k.to(rd), cache.v.to(rd), cache.block_tables, qsl,
                                            cache.seq_lens, scale)
    return out, ref


@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
def test_paged_prefill_matches_reference(case: PrefillCase):
    seed = fresh_seed()
    seqs = prefill_batch(case.scale_len, case.page, random.Random(seed + 1))
    if ON_GPU and case.scale_len >= 1024:
        seqs += [(1024, 1024), (512, 2048), (1, 2048)]
    out, ref = run_prefill(case, seqs, seed)
    check(out, ref, case.dtype, f"prefill {case} seed={seed} seqs={seqs}")


def test_paged_prefill_edge_batches():
    """Edge batches: one sequence whose queries fill exactly whole tiles; only 1-token rows; a sequence with no
    queries at all between two others (the tile map must skip it); contexts around a KV-tile boundary, where the
    unmasked tiles end and the diagonal ones begin (context = tile - 2, - 1, + 0, + 1)."""
    seed = fresh_seed()
    case = (PrefillCase(BF16, 32, 8, 128, 16, 0) if ON_GPU else PrefillCase(FP32, 6, 2, 16, 8, 0, 16, 16))
    tile = case.block_m or PREFILL_BLOCK_M
    kv_tile = case.block_n or PREFILL_BLOCK_N
    boundary = [(q, ctx + q) for ctx in (kv_tile - 2, kv_tile - 1, kv_tile, kv_tile + 1) for q in (5, tile + 1)]
    for route in (True, False):
        case.route = route
        for seqs in ([(2 * tile, 2 * tile)], [(1, 1), (1, 37), (1, 2 * tile + 3)],
                     [(5, 9), (0, 4), (1, 6), (tile + 1, tile + 1)], boundary):
            out, ref = run_prefill(case, seqs, seed)
            check(out, ref, case.dtype, f"prefill {seqs} route={route} seed={seed}")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_varlen_rows_of_a_mixed_batch(num_splits):
    """The decode kernel on a flat mixed batch (query_start_loc given): exactly the single-query sequences' rows are
    written, right; every other row is left as it was (NaN here)."""
    seed = fresh_seed()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    H, KVH, D, page, dtype, bn = (32, 8, 128, 16, BF16, None) if ON_GPU else (6, 2, 16, 8, FP16, 16)
    seqs = [(1, 50), (9, 30), (1, 1), (1, 0), (4, 4), (1, 33)]           # (1, 0): a padding row
    if ON_GPU:
        seqs += [(1, rng.randint(1, 2048)) for _ in range(40)] + [(700, 1500)]
    rng.shuffle(seqs)
    seqs.insert(seqs.index((9, 30)), (0, 5))        # no queries: its start row is the next sequence's first
    qlens, lens = [s[0] for s in seqs], [s[1] for s in seqs]
    cache = make_paged_cache(lens, KVH, D, page, dtype, rng)
    T = sum(qlens)
    q = strided_queries(T, H, KVH, D, dtype)
    starts = np.cumsum([0] + qlens).tolist()
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEV)
    out = torch.full((T, H, D), float("nan"), device=DEV, dtype=dtype)
    paged_decode_attention(q, cache.k, cache.v, cache.block_tables, cache.seq_lens, D ** -0.5, num_splits,
                           out=out, block_n=bn, query_start_loc=qsl)
    decode = [b for b, n in enumerate(qlens) if n == 1]
    rows = torch.tensor([starts[b] for b in decode], device=DEV)
    written = torch.zeros(T, dtype=torch.bool, device=DEV)
    written[rows] = True
    assert torch.isnan(out[~written]).all(), f"rows of multi-query sequences were written (seed={seed})"
    rd = ref_dtype(dtype)
    idx = torch.tensor(decode, device=DEV)
    ref = paged_decode_attention_reference(q[rows].to(rd), cache.k.to(rd), cache.v.to(rd), cache.block_tables[idx],
                                           cache.seq_lens[idx].contiguous(), D ** -0.5)
    check(out[rows], ref, dtype, f"varlen decode splits={num_splits} seed={seed} seqs={seqs}",
          cache.seq_lens[idx] == 0)


# ---- the references implement the engine's semantics --------------------------------------------------------------
def test_kernels_match_engine_torch_attention():
    """A mixed step (decode rows, a plain prefill, a chunked continuation) through the engine's TorchAttention,
    which also writes the new K/V, then the prefill kernel on the whole batch and the decode kernel on its 1-token
    rows, over the cache TorchAttention wrote: the kernels compute what the engine computes."""
    seed = fresh_seed()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    H, KVH, D, page = (32, 8, 128, 16) if ON_GPU else (6, 2, 16, 8)
    dtype = FP32
    seqs = [(1, 40), (13, 13), (1, 1), (7, 30), (1, 17)] if not ON_GPU else [(1, 900), (700, 700), (1, 1),
                                                                            (300, 1500), (1, 1024)]
    qlens, lens = [s[0] for s in seqs], [s[1] for s in seqs]
    cache = make_paged_cache(lens, KVH, D, page, dtype, rng, poison=False)
    table = cache.block_tables.long()
    starts = np.cumsum([0] + qlens).tolist()
    slots = []
    for b, (n, L) in enumerate(seqs):
        pos = torch.arange(L - n, L, device=DEV)
        slots.append(table[b, pos // page] * page + pos % page)
    T = sum(qlens)
    md = AttentionMetadata(slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32,
                                                                                       device=DEV),
                           seq_lens=cache.seq_lens, block_tables=cache.block_tables, max_query_len=max(qlens),
                           max_seq_len=max(lens), query_lens_cpu=qlens, seq_lens_cpu=lens)
    q = strided_queries(T, H, KVH, D, dtype)
    k_new = torch.randn(T, KVH, D, device=DEV, dtype=dtype)
    v_new = torch.randn(T, KVH, D, device=DEV, dtype=dtype)
    engine_out = TorchAttention()(q, k_new, v_new, cache.k, cache.v, md, D ** -0.5)

    out = torch.full_like(engine_out, float("nan"))
    paged_prefill_attention(q, cache.k, cache.v, cache.block_tables, md.query_start_loc, cache.seq_lens,
                            D ** -0.5, max(qlens), out=out, block_m=None if ON_GPU else 16,
                            block_n=None if ON_GPU else 16)
    check(out, engine_out, dtype, f"prefill kernel vs TorchAttention seed={seed}")

    rows = [b for b, n in enumerate(qlens) if n == 1]
    idx = torch.tensor(rows, device=DEV)
    dec = torch.full((len(rows), H, D), float("nan"), device=DEV, dtype=dtype)
    paged_decode_attention(q[torch.tensor([starts[b] for b in rows], device=DEV)], cache.k, cache.v,
                           cache.block_tables[idx], cache.seq_lens[idx].contiguous(), D ** -0.5, 2, out=dec,
                           block_n=None if ON_GPU else 16)
    check(dec, engine_out[torch.tensor([starts[b] for b in rows], device=DEV)], dtype,
          f"decode kernel vs TorchAttention seed={seed}")


# ---- CUDA graphs --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_paged_decode_cuda_graph_replay():
    """Captured once (grid fixed by B, KVH, num_splits), replayed with new lengths (padding rows included) and new
    queries written into the captured buffers: right every time, so nothing was read on the host at capture."""
    seed = fresh_seed()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, H, KVH, D, page, max_len = 8, 32, 8, 128, 16, 2048          # 64 programs: default_num_splits gives 3
    cache = make_paged_cache([max_len] * B, KVH, D, page, BF16, rng)
    splits = default_num_splits(B, KVH, max_len, decode_tile(D, BF16)[0])
    assert splits > 1
    q = torch.randn(B, H, D, device=DEV, dtype=BF16)
    seq_lens = cache.seq_lens.clone()
    out = torch.empty(B, H, D, device=DEV, dtype=BF16)

    def step():
        paged_decode_attention(q, cache.k, cache.v, cache.block_tables, seq_lens, D ** -0.5, splits, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                          # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        lens = [0 if rng.random() < 0.2 else rng.randint(1, max_len) for _ in range(B)]
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(B, H, D, device=DEV, dtype=BF16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_reference(q.float(), cache.k.float(), cache.v.float(), cache.block_tables,
                                               seq_lens, D ** -0.5)
        check(out, ref, BF16, f"graph replay {trial} seed={seed} lens={lens}", seq_lens == 0)
