"""Prefill and mixed steps replayed as CUDA graphs between eager attentions (engine/cuda_graphs.py, MixedGraphs).

The graphs rest on one property of the model, checked on any device: between two attentions every token's row is
computed on its own, so a batch padded with arbitrary rows gives its real rows what the unpadded forward gives. On
the GPU: the graphs' hidden states equal the eager forward's for prefill and mixed batches of several sizes."""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import random_prompts
from engine import LLM
from engine.attention import AttentionMetadata, set_attention_metadata
from engine.cuda_graphs import token_ladder

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    import transformers
    config = transformers.LlamaConfig(hidden_size=256 if GPU else 64, intermediate_size=512 if GPU else 128,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=512, max_position_embeddings=1024, initializer_range=0.1,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mixed-graphs-model")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    llm = LLM(str(path), progress=False, device="cuda" if GPU else "cpu", dtype="float32",
              max_num_batched_tokens=512, num_blocks=512)
    yield llm.engine.runner
    del llm
    gc.collect()            # the next module's engines size their KV pool from the memory left free


def _chunks(runner, lengths: list[int], first_block: int = 0):
    """Prompt chunks from position 0 of fresh sequences, each on its own blocks."""
    chunks, block = [], first_block
    for i, n in enumerate(lengths):
        count = -(-n // runner.block_size)
        tokens = random_prompts(1, n, n, vocab=512, seed=100 + i)[0]
        chunks.append((list(range(block, block + count)), tokens, 0))
        block += count
    return chunks


def test_padding_rows_leave_the_real_rows_alone(runner):
    """The model's pieces over a batch padded with junk rows (ids, positions, attention outputs) give the real
    rows the hidden states of the plain forward."""
    lengths = [7, 3, 12]
    chunks = _chunks(runner, lengths)
    expected = runner._forward_prefill(chunks).clone()
    T, pad = sum(lengths), 13
    bs = runner.block_size
    ids = torch.tensor([t for _, tokens, _ in chunks for t in tokens])
    positions = torch.cat([torch.arange(n) for n in lengths])
    slots = torch.tensor([table[p // bs] * bs + p % bs for table, tokens, _ in chunks for p in range(len(tokens))])
    width = max(len(table) for table, _, _ in chunks)
    tables = torch.tensor([table + [0] * (width - len(table)) for table, _, _ in chunks], dtype=torch.int32)
    starts = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    dev = runner.device
    md = AttentionMetadata(slot_mapping=slots.to(dev), query_start_loc=starts.to(dev),
                           seq_lens=torch.tensor(lengths, dtype=torch.int32, device=dev),
                           block_tables=tables.to(dev), max_query_len=max(lengths), max_seq_len=max(lengths),
                           query_lens_cpu=lengths, seq_lens_cpu=lengths)
    generator = torch.Generator().manual_seed(0)
    padded_ids = torch.cat([ids, torch.randint(0, 512, (pad,), generator=generator)]).to(dev)
    padded_positions = torch.cat([positions, torch.randint(0, 1024, (pad,), generator=generator)]).to(dev)
    set_attention_metadata(md)
    try:
        pieces = runner.model.pieces(padded_ids, padded_positions)
        call, layers = next(pieces), 0
        while True:
            attention, q, k, v = call
            assert q.shape[0] == T + pad
            out = torch.randn(q.shape, generator=generator).to(dev) * 100     # junk beyond the real rows
            attention.attend(q[:T], k[:T], v[:T], out=out[:T])
            layers += 1
            try:
                call = pieces.send(out)
            except StopIteration as end:
                hidden = end.value
                break
    finally:
        set_attention_metadata(None)
    assert layers == len(runner.model.layers)
    torch.testing.assert_close(hidden[:T], expected, rtol=1e-5, atol=1e-5)


def test_token_ladder():
    assert token_ladder(2048)[:4] == [32, 64, 128, 192] and token_ladder(2048)[-1] == 2048
    assert token_ladder(300) == [32, 64, 128, 192, 256, 300]
    sizes = token_ladder(2048)
    # from 512 tokens on, padding to the next size adds at most ~12%
    assert all(b / (a + 1) <= 1.13 for a, b in zip(sizes, sizes[1:]) if a >= 512)


def _replayed_then_eager(runner, chunks):
    """The hidden states of one forward through the graphs (checking it replayed), then of the eager forward."""
    graphs = runner.mixed_graphs
    steps = graphs.steps
    replayed = runner._forward_prefill(chunks).clone()
    assert graphs.steps == steps + 1
    runner.mixed_graphs = None
    try:
        return replayed, runner._forward_prefill(chunks)
    finally:
        runner.mixed_graphs = graphs


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_graphs_give_the_eager_hidden_states(runner):
    graphs = runner.mixed_graphs
    assert graphs is not None and graphs.sizes == token_ladder(512) and graphs.max_tokens == 512
    first = 0
    for lengths in ([5], [40, 1, 1, 17], [200, 33, 100], [511], [256, 256]):
        chunks = _chunks(runner, lengths, first)
        first += sum(len(table) for table, _, _ in chunks)
        torch.testing.assert_close(*_replayed_then_eager(runner, chunks), rtol=1e-4, atol=1e-4)
    # a mixed step: a decode row continuing the last sequence, next to a new prompt
    table, tokens, _ = chunks[-1]
    mixed = [(table, [tokens[-1]], len(tokens) - 1)] + _chunks(runner, [90], first)
    torch.testing.assert_close(*_replayed_then_eager(runner, mixed), rtol=1e-4, atol=1e-4)
