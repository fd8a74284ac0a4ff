"""A decode batch kept on the device, so k decode steps run with no trip to the host.

One row per sequence: the token it computes next (input_ids, on the device only: it is what the step before
sampled), that token's position, the context length with it (seq_lens), the cache slot its K/V goes to, its block
table, and how many more steps it takes after this one (steps_left). After each step, kernels/advance_step.py
turns the sampled tokens into the next step's rows in one launch. Rows past the batch (up to the CUDA graph's
size) are padding: length 0, slot -1, so they write nothing and read nothing.

Positions, lengths and steps advance deterministically, so the host keeps mirrors of them (for the reference
attention on the CPU, and to know which rows are still stepping) without ever reading the device.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.block_table import BlockTable, stack_tables
from engine.staging import pinned, to_device


class DecodeBatch:
    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device):
        self.max_batch, self.max_blocks, self.block_size, self.device = max_batch, max_blocks, block_size, device
        zeros = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids = zeros(max_batch)
        self.positions = zeros(max_batch)
        self.seq_lens = zeros(max_batch, dtype=torch.int32)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = zeros(max_batch, max_blocks, dtype=torch.int32)
        self.steps_left = zeros(max_batch, dtype=torch.int32)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)   # one token a row
        self.seq_ids: list[int] = []
        self.width = 1                          # block-table columns the loaded rows use
        self.positions_host: list[int] = []
        self.steps_left_host: list[int] = []

    @property
    def size(self) -> int:
        return len(self.seq_ids)

    def load(self, seq_ids: list[int], positions: list[int], tables: list[BlockTable], steps_left: list[int],
             input_ids: torch.Tensor | list[int]) -> None:
        """Rows for the next step: sequence seq_ids[b] computes input_ids[b] (a device tensor from the step
        before, or host ids) at positions[b], then takes steps_left[b] more steps."""
        n, bs = len(seq_ids), self.block_size
        # Only the columns some row uses travel: the device table is max_model_len / block_size wide (8,192
        # columns for a 128k context), and staging all of them cost milliseconds a plan, with the GPU idle.
        mb = max((len(t) for t in tables), default=1)
        assert n <= self.max_batch and mb <= self.max_blocks
        self.seq_ids, self.positions_host, self.steps_left_host = list(seq_ids), list(positions), list(steps_left)
        self.width = mb
        # One staging buffer on the host, as int64: [positions | seq_lens | slots | steps_left] for every row up to
        # max_batch (the padding rows too: nothing to attend to, nothing to write), then the loaded rows' block
        # tables. A new one each time: the host runs ahead of the GPU, and a reused buffer could be overwritten
        # before the asynchronous copy of the previous load has read it. On the device, one copy_ a tensor (it
        # converts the dtype in the same launch): each launch is host time while the GPU waits for the plan.
        size = self.max_batch
        stage, host = pinned((4 * size + n * mb,), torch.int64, self.device)
        rows, flat = host[:4 * size].reshape(4, size), host[4 * size:].reshape(n, mb)
        stack_tables(tables, flat)
        rows[:, n:] = np.array([[0], [0], [-1], [0]])
        rows[0, :n] = positions
        rows[1, :n] = rows[0, :n] + 1
        rows[2, :n] = flat[np.arange(n), rows[0, :n] // bs] * bs + rows[0, :n] % bs
        rows[3, :n] = steps_left
        device_stage = stage.to(self.device, non_blocking=True)
        d = device_stage[:4 * size].view(4, size)
        self.positions.copy_(d[0])
        self.seq_lens.copy_(d[1])
        self.slot_mapping.copy_(d[2])
        self.steps_left.copy_(d[3])
        self.block_tables[:n, :mb].copy_(device_stage[4 * size:].view(n, mb))
        self.block_tables[:n, mb:] = 0          # a filled device tensor: no host work
        self.input_ids[:n] = input_ids if isinstance(input_ids, torch.Tensor) else \
            to_device(input_ids, torch.int64, self.device)

    def rows(self, n: int) -> torch.Tensor:
        """What a forward reads of the first n rows, as one int64 tensor on the device (tensor parallelism: the
        driver broadcasts it to the ranks that hold no batch of their own; set_rows takes it)."""
        return torch.cat([self.input_ids[:n], self.positions[:n], self.seq_lens[:n].long(), self.slot_mapping[:n],
                          self.block_tables[:n, :self.width].long().flatten()])

    def set_rows(self, n: int, width: int, rows: torch.Tensor) -> None:
        input_ids, positions, seq_lens, slots, tables = rows.split([n, n, n, n, n * width])
        self.input_ids[:n], self.positions[:n], self.slot_mapping[:n] = input_ids, positions, slots
        self.seq_lens[:n] = seq_lens.to(torch.int32)
        self.block_tables[:n, :width] = tables.view(n, width).to(torch.int32)
        self.block_tables[:n, width:] = 0
        self.seq_lens[n:] = 0
        self.slot_mapping[n:] = -1
        self.width = width

    def advance(self, sampled: torch.Tensor, advance_step) -> None:
        """The next step's rows from this step's sampled tokens (on the device); the host mirrors follow."""
        advance_step(sampled, self.input_ids, self.positions, self.seq_lens, self.slot_mapping, self.block_tables,
                     self.steps_left, self.block_size)
        for b, left in enumerate(self.steps_left_host):
            if left > 0:
                self.positions_host[b] += 1
                self.steps_left_host[b] = left - 1
            else:
                self.steps_left_host[b] = -1           # stopped: its tokens from now on are not its own

    def active(self, b: int) -> bool:
        """Whether row b's output of the current step belongs to its sequence."""
        return self.steps_left_host[b] >= 0
