"""The decode forward (embedding to logits) as CUDA graphs, one per batch size of a ladder.

A decode step of a big model is a few hundred kernel launches; replayed as one graph it costs the CPU a few
microseconds and leaves no gaps on the GPU. Every graph reads its inputs from the DecodeBatch's static buffers
(padding rows beyond the live batch do nothing), and writes its logits into one shared buffer. Prefill and mixed
steps stay eager: their shapes change every step.
"""
from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata, set_attention_metadata
from engine.decode_batch import DecodeBatch

log = logging.getLogger("pagestream.cuda_graphs")


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond: padding wastes at most ~12%."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 257, 16)) + list(range(288, 1025, 32))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(self, model, batch: DecodeBatch, max_seq_len: int, num_splits):
        self.model, self.batch, self.max_seq_len, self.num_splits = model, batch, max_seq_len, num_splits
        self.sizes = batch_ladder(batch.max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits = torch.empty(batch.max_batch, model.args.vocab_size, dtype=torch.float32,
                                  device=batch.device)     # shared: each replay overwrites its rows

    def metadata(self, size: int) -> AttentionMetadata:
        b = self.batch
        return AttentionMetadata(
            slot_mapping=b.slot_mapping[:size], query_start_loc=b.query_start_loc[:size + 1],
            seq_lens=b.seq_lens[:size], block_tables=b.block_tables[:size], max_query_len=1,
            max_seq_len=self.max_seq_len, query_lens_cpu=[], seq_lens_cpu=[], decode_only=True,
            num_splits=self.num_splits(size, self.max_seq_len))

    def forward(self, size: int, metadata: AttentionMetadata) -> torch.Tensor:
        set_attention_metadata(metadata)
        try:
            hidden = self.model(self.batch.input_ids[:size], self.batch.positions[:size])
            return self.model.compute_logits(hidden, out=self.logits[:size])
        finally:
            set_attention_metadata(None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, all in one memory pool (smaller graphs reuse what larger ones needed)."""
        self.batch.load([], [], [], [], [])          # every row is padding while capturing
        pool = None
        for size in reversed(self.sizes):
            metadata = self.metadata(size)
            for _ in range(2):                      # compile the Triton kernels, settle the allocator
                self.forward(size, metadata)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.forward(size, metadata)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", self.sizes)

    def run(self, n: int) -> torch.Tensor:
        """Replay the smallest graph that holds n rows: logits [n, V]."""
        size = next(s for s in self.sizes if s >= n)
        self.graphs[size].replay()
        return self.logits[:n]
