"""The forward as CUDA graphs: whole for decode steps, in pieces between attentions for prefill and mixed steps.

A step of a big model is a few hundred kernel launches, and launched from Python they can take longer than the
GPU needs to run them. DecodeGraphs: a decode step's forward (embedding to logits) replayed as one graph, one per
batch size of a ladder; it costs the CPU a few microseconds and leaves no gaps on the GPU. Every graph reads its
inputs from the DecodeBatch's static buffers (padding rows beyond the live batch do nothing), and writes its
logits into one shared buffer.

MixedGraphs: a prefill or mixed step's attention depends on its sequences (how many, how long, which prompt
chunks), so it stays eager; everything between two attentions works on each token's row alone, so those pieces
are replayed as graphs, one set per token count of a ladder, the batch padded to the next size. This is vLLM's
piecewise CUDA graph, without the compiler: the model splits its own forward (LlamaForCausalLM.pieces).
"""
from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata, set_attention_metadata
from engine.decode_batch import DecodeBatch

log = logging.getLogger("pagestream.cuda_graphs")


def upload(graphs) -> None:
    """Launch each captured graph once, now. A graph's first launch also uploads it to the device (torch
    instantiates a graph at capture but does not upload it): that launch takes longer on the host, and the upload
    runs on the stream ahead of the graph's kernels. The warm-up meets only some sizes, so without this the first
    busy run after a start would pay for the others, size by size, while the GPU waits. Replaying is safe here:
    nothing is in flight, a decode graph's rows are all padding (nothing read, nothing written to the KV cache),
    and a mixed-step piece only computes row by row into the graphs' own buffers, whose padding rows nothing
    reads."""
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()


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
        upload(self.graphs.values())
        log.info("captured decode graphs for batch sizes %s", self.sizes)

    def run(self, n: int) -> torch.Tensor:
        """Replay the smallest graph that holds n rows: logits [n, V]."""
        size = next(s for s in self.sizes if s >= n)
        self.graphs[size].replay()
        return self.logits[:n]


# The largest step replayed. Up to here an eager step's launches take the host about as long as the GPU needs, or
# longer (Llama-3-8B, one H200: ~15 ms of launching, 16 ms of kernels at 600 tokens); beyond, graphs save little
# of a step and its padding costs more.
MIXED_GRAPH_MAX_TOKENS = 2048


def token_ladder(max_tokens: int) -> list[int]:
    """Up to 128 tokens a step's GEMMs are bound by reading the weights, so padding costs little: 32, 64, 128;
    then every 64 up to 1024 and every 128 beyond, so padding adds at most ~12% of a step from 512 tokens on."""
    sizes = [32, 64] + list(range(128, 1025, 64)) + list(range(1152, 8193, 128))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


class MixedGraphs:
    def __init__(self, model, max_tokens: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.sizes = token_ladder(max_tokens)
        self.max_tokens = max_tokens
        attention = model.layers[0].self_attn         # this rank's heads (tensor parallelism)
        # The graphs' inputs and outputs, at fixed addresses, shared by all sizes (one step replays at a time).
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.q = torch.zeros(max_tokens, attention.num_heads, attention.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(max_tokens, attention.num_kv_heads, attention.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attention_out = torch.zeros_like(self.q)
        self.hidden = torch.zeros(max_tokens, model.args.hidden_size, dtype=dtype, device=device)
        # size -> one graph per piece; and the Attention that runs after each piece but the last
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.attentions = [layer.self_attn for layer in model.layers]
        self.steps = 0                          # steps replayed (tests and stats)

    def _pieces(self, size: int):
        return self.model.pieces(self.input_ids[:size], self.positions[:size],
                                 (self.q[:size], self.k[:size], self.v[:size]))

    def _piece(self, pieces, size: int, first: bool) -> bool:
        """Run the next piece; False once the forward is done (its hidden states copied to self.hidden)."""
        try:
            next(pieces) if first else pieces.send(self.attention_out[:size])
        except StopIteration as end:
            self.hidden[:size].copy_(end.value)
            return False
        return True

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, all in one memory pool. A piece's temporaries are free once it ends, so every graph
        may reuse them; what a piece leaves for the next (the residual stream) stays allocated until that next
        piece has been captured, and a step replays one size's pieces in order, so nothing live is overwritten."""
        pool = None
        for size in reversed(self.sizes):
            for _ in range(2):                  # compile the Triton kernels, settle the allocator and cuBLAS
                pieces, first = self._pieces(size), True
                while self._piece(pieces, size, first):
                    first = False
            graphs, more = [], True
            pieces = self._pieces(size)
            while more:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    more = self._piece(pieces, size, not graphs)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[size] = graphs
        upload(graph for graphs in self.graphs.values() for graph in graphs)
        log.info("captured mixed-step graphs for %s tokens (%d pieces each)", self.sizes, len(graphs))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The forward over T <= max_tokens tokens (the attention metadata set by the caller): hidden [T, D].
        The padding rows keep whatever the last step left there: valid ids and positions, whose rows nothing
        reads."""
        T = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= T)
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        graphs = self.graphs[size]
        self.steps += 1
        for graph, attention in zip(graphs, self.attentions):
            graph.replay()
            attention.attend(self.q[:T], self.k[:T], self.v[:T], out=self.attention_out[:T])
        graphs[-1].replay()
        return self.hidden[:T]

