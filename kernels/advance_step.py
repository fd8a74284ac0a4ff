"""advance_step: turn decode step n's sampled tokens into step n+1's inputs on the GPU (multi-step decoding).

The decode batch lives in device tensors of the CUDA graph's batch size Bg; the first B rows are real sequences.
For each row b < B with steps left: the sampled token becomes its input, its position and sequence length grow by
one, its new token's cache slot is looked up in its block table, and one step is used up. A row with no steps left
(its sequence used the steps it was scheduled for, its blocks cover only those) gets slot -1, so the KV write
skips it, and keeps the rest. Rows >= B are not touched. One launch, in place, no host reads: the grid depends on B
only, so it can run between graph replays or be captured itself.

A position past the end of its block table (a scheduler bug) also gets slot -1 instead of an out-of-bounds read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_B = 128           # rows per program: a decode batch is a few hundred rows, so one or a few programs


@triton.jit(do_not_specialize=["B"])
def _advance_step_kernel(sampled_ptr, input_ids_ptr, positions_ptr, seq_lens_ptr, slot_ptr, block_tables_ptr,
                         steps_left_ptr, B, max_blocks, block_table_stride,
                         BLOCK_SIZE: tl.constexpr,        # KV block size, a power of two: // and % are shifts
                         BLOCK_B: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < B
    steps = tl.load(steps_left_ptr + b, mask=in_batch, other=0)
    active = in_batch & (steps > 0)
    pos = tl.load(positions_ptr + b, mask=active, other=0) + 1
    block_index = pos // BLOCK_SIZE
    in_table = active & (block_index < max_blocks)
    block = tl.load(block_tables_ptr + b.to(tl.int64) * block_table_stride + block_index, mask=in_table, other=0)
    slot = tl.where(in_table, block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE, -1)
    tl.store(slot_ptr + b, slot, mask=in_batch)
    tl.store(input_ids_ptr + b, tl.load(sampled_ptr + b, mask=active), mask=active)
    tl.store(positions_ptr + b, pos, mask=active)
    tl.store(seq_lens_ptr + b, tl.load(seq_lens_ptr + b, mask=active) + 1, mask=active)
    tl.store(steps_left_ptr + b, steps - 1, mask=active)


def _check(sampled, input_ids, positions, seq_lens, slot_mapping, block_tables, steps_left, block_size):
    B, Bg = sampled.shape[0], input_ids.shape[0]
    assert B <= Bg and block_size > 0 and block_size & (block_size - 1) == 0, "block_size: a power of two"
    for name, x, dtype in (("sampled", sampled, torch.int64), ("input_ids", input_ids, torch.int64),
                           ("positions", positions, torch.int64), ("seq_lens", seq_lens, torch.int32),
                           ("slot_mapping", slot_mapping, torch.int64), ("steps_left", steps_left, torch.int32)):
        assert x.dtype == dtype and x.is_contiguous(), f"{name}: {dtype}, contiguous"
        assert x.shape == ((B,) if name == "sampled" else (Bg,)), f"{name}: shape {tuple(x.shape)}"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == Bg
    assert block_tables.stride(1) == 1


def advance_step(sampled: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, steps_left: torch.Tensor,
                 block_size: int) -> None:
    """sampled int64 [B]; input_ids, positions, slot_mapping int64 [Bg]; seq_lens, steps_left int32 [Bg];
    block_tables int32 [Bg, max_blocks]; Bg >= B. Updates rows < B in place."""
    _check(sampled, input_ids, positions, seq_lens, slot_mapping, block_tables, steps_left, block_size)
    B = sampled.shape[0]
    if B == 0:
        return
    _advance_step_kernel[(triton.cdiv(B, BLOCK_B),)](
        sampled, input_ids, positions, seq_lens, slot_mapping, block_tables, steps_left,
        B, block_tables.shape[1], block_tables.stride(0), BLOCK_SIZE=block_size, BLOCK_B=BLOCK_B, num_warps=4)


def advance_step_reference(sampled: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                           seq_lens: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                           steps_left: torch.Tensor, block_size: int) -> None:
    """The same, as vectorized torch (no host reads either)."""
    _check(sampled, input_ids, positions, seq_lens, slot_mapping, block_tables, steps_left, block_size)
    B, max_blocks = sampled.shape[0], block_tables.shape[1]
    active = steps_left[:B] > 0
    pos = positions[:B] + active.long()
    block_index = pos // block_size
    in_table = active & (block_index < max_blocks)
    block = block_tables[:B].gather(1, block_index.clamp(max=max_blocks - 1)[:, None])[:, 0].long()
    slot_mapping[:B] = torch.where(in_table, block * block_size + pos % block_size, -1)
    input_ids[:B] = torch.where(active, sampled, input_ids[:B])
    positions[:B] = pos
    seq_lens[:B] += active.int()
    steps_left[:B] -= active.int()
