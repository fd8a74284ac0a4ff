"""Attention over the paged KV cache: the per-forward metadata, and the PyTorch reference backend.

The model runner fills one AttentionMetadata per forward and sets it here; every attention layer reads it
(nano-vllm's context object), so the model's forward signature stays (input_ids, positions).

A batch is flat: T new tokens from B sequences, sequence b's tokens at query_start_loc[b]:query_start_loc[b+1].
Sequence b attends to its seq_lens[b] cached tokens (its context plus its new ones, causally), found through its
row of block_tables. A backend is any callable with TorchAttention's signature: TorchAttention (the reference, for
the CPU) and TritonAttention (kernels/attention.py, for the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.kv_cache import write_kv_reference


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor    # [B + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor           # [B] int32: tokens in the cache once this step's are written
    block_tables: torch.Tensor       # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]        # host copies, so no backend has to read the device to plan its work
    seq_lens_cpu: list[int]
    decode_only: bool = False        # every sequence computes exactly one token (the CUDA-graph batches)
    num_splits: int = 1              # flash-decoding: how many programs share each sequence's context


_metadata: AttentionMetadata | None = None


def set_attention_metadata(metadata: AttentionMetadata | None) -> None:
    global _metadata
    _metadata = metadata


def get_attention_metadata() -> AttentionMetadata:
    assert _metadata is not None, "attention ran outside a model runner forward"
    return _metadata


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of each row of block_tables: [B, length, KVH, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size      # [B, length]
    return cache.view(-1, *cache.shape[2:])[slots]


class TorchAttention:
    """Reference backend: exact, simple, used on the CPU and as the oracle for the Triton kernels."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] -> [T, H, D] (into `out` if given)
        write_kv_reference(k, v, k_cache, v_cache, md.slot_mapping)
        out = torch.empty_like(q) if out is None else out
        decode_rows = [b for b, n in enumerate(md.query_lens_cpu) if n == 1]
        if decode_rows:
            self._decode(q, k_cache, v_cache, md, scale, decode_rows, out)
        starts = md.query_start_loc.tolist() if len(decode_rows) < len(md.query_lens_cpu) else []
        for b, n in enumerate(md.query_lens_cpu):
            if n > 1:
                s, L = starts[b], md.seq_lens_cpu[b]
                out[s:s + n] = self._prefill(q[s:s + n], k_cache, v_cache, md.block_tables[b:b + 1], L, scale)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, md, scale, rows, out) -> None:
        """One query per sequence, all sequences at once, padded to the longest context."""
        index = torch.tensor(rows, device=q.device)
        starts = md.query_start_loc[:-1][index].long()
        max_len = max(md.seq_lens_cpu[b] for b in rows)
        k = gather_kv(k_cache, md.block_tables[index], max_len).transpose(1, 2)   # [B, KVH, L, D]
        v = gather_kv(v_cache, md.block_tables[index], max_len).transpose(1, 2)
        visible = torch.arange(max_len, device=q.device)[None, :] < md.seq_lens[index][:, None]   # [B, L]
        o = F.scaled_dot_product_attention(q[starts][:, :, None, :].float(), k.float(), v.float(),
                                           attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True)
        out[starts] = o[:, :, 0].to(out.dtype)

    @staticmethod
    def _prefill(q, k_cache, v_cache, block_table, seq_len, scale) -> torch.Tensor:
        """n queries at the end of a seq_len-token context, causal."""
        n = q.shape[0]
        k = gather_kv(k_cache, block_table, seq_len)[0].transpose(0, 1)           # [KVH, L, D]
        v = gather_kv(v_cache, block_table, seq_len)[0].transpose(0, 1)
        visible = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - n)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.float(), v.float(), attn_mask=visible,
                                           scale=scale, enable_gqa=True)
        return o.transpose(0, 1).to(q.dtype)


class TritonAttention:
    """The GPU backend: write the new K/V, then paged flash-decoding for decode batches (CUDA-graph safe: it
    reads lengths and tables from the device) or paged flash-attention for prefill and mixed batches."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, md: AttentionMetadata, scale: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        from kernels.attention import paged_decode_attention, paged_prefill_attention
        from kernels.kv_cache import write_kv
        write_kv(k, v, k_cache, v_cache, md.slot_mapping)
        if md.decode_only:
            return paged_decode_attention(q, k_cache, v_cache, md.block_tables, md.seq_lens, scale, md.num_splits,
                                          out)
        return paged_prefill_attention(q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens,
                                       scale, md.max_query_len, out)
