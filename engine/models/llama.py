"""The Llama family in one file: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm),
SmolLM2 (tied embeddings). (Attention is full: a Mistral sliding window caps max_model_len, see model_files.)

Tokens arrive flat: T tokens from any number of sequences, with their positions; attention finds each token's
sequence and context through the metadata the runner set (engine.attention). Q, K and V come from one fused
projection, gate and up from another. Shapes: T tokens, D hidden, H query heads, KVH key/value heads, Dh head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import get_attention_metadata
from engine.ops import Ops

if TYPE_CHECKING:
    from engine.tensor_parallel import TensorParallel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None           # llama3-style scaling parameters, or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool                      # Qwen2
    qk_norm: bool                       # Qwen3: RMSNorm over each head of q and k before rotary

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        # transformers 5 keeps rope settings in rope_parameters; older configs use rope_theta and rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        rope.update(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With a residual: adds it first and also returns the sum, the next layer's residual."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def rotary_inv_freq(args: LlamaArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Hugging Face's layout: each head's first half rotates against its second half."""

    def __init__(self, args: LlamaArgs, max_len: int, ops: Ops):
        super().__init__()
        self.args, self.max_len, self.ops = args, max_len, ops
        self.cos_sin: torch.Tensor | None = None        # [max_len, Dh] fp32: cos | sin of the half-dim angles

    def build(self, device: torch.device) -> None:
        angles = torch.arange(self.max_len, dtype=torch.float32)[:, None] * rotary_inv_freq(self.args)[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
        return self.ops.apply_rotary(q, k, positions, self.cos_sin, q_out, k_out)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding, ops: Ops, tp: TensorParallel | None):
        super().__init__()
        # This rank's heads (all of them without tensor parallelism): query heads and their key/value heads
        # stay together, so attention needs no communication.
        ranks = tp.size if tp else 1
        self.num_heads = args.num_heads // ranks
        self.num_kv_heads = args.num_kv_heads // ranks
        self.head_dim = args.head_dim
        self.q_size, self.kv_size = self.num_heads * args.head_dim, self.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)      # a partial sum on each rank
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, ops) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, ops) if args.qk_norm else None
        self.rotary = rotary
        self.scale = args.head_dim ** -0.5
        self.attention = ops.attention
        self.k_cache = self.v_cache = torch.empty(0)     # views into the runner's KV pool

    def project(self, positions: torch.Tensor, x: torch.Tensor, out: tuple[torch.Tensor, ...] | None = None):
        """x [T, D] -> q [T, H, Dh], k and v [T, KVH, Dh], rotated (into the buffers `out` if given)."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:          # per head: [T * heads, Dh] rows
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        if out is None:
            return (*self.rotary(positions, q, k), v)
        q_out, k_out, v_out = out
        self.rotary(positions, q, k, q_out, k_out)
        return q_out, k_out, v_out.copy_(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the paged KV cache (this step's k and v are written into it first) -> [T, H, Dh]."""
        return self.attention(q, k, v, self.k_cache, self.v_cache, get_attention_metadata(), self.scale, out)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs, ops: Ops, tp: TensorParallel | None):
        super().__init__()
        self.ops = ops
        width = args.intermediate_size // (tp.size if tp else 1)      # this rank's columns
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, args.hidden_size, bias=False)     # a partial sum on each rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """A layer's parameters; LlamaForCausalLM.pieces runs it (split at its attention)."""

    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding, ops: Ops, tp: TensorParallel | None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.self_attn = Attention(args, rotary, ops, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.mlp = MLP(args, ops, tp)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter, shard index)
    FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    # checkpoint projection -> the dimension tensor parallelism splits (rows of a column-parallel layer, columns
    # of a row-parallel one); the rest (norms) is whole on every rank
    SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1,
                 "embed_tokens": 0, "lm_head": 0}

    def __init__(self, args: LlamaArgs, max_len: int, ops: Ops, tp: TensorParallel | None = None):
        super().__init__()
        self.args, self.ops, self.tp = args, ops, tp
        if tp is not None:
            self.check_tensor_parallel(args, tp.size)
        self.rotary = RotaryEmbedding(args, max_len, ops)
        self.vocab_per_rank = args.vocab_size // (tp.size if tp else 1)
        self.embed_tokens = nn.Embedding(self.vocab_per_rank, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, self.rotary, ops, tp) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.lm_head = None if args.tie_word_embeddings else \
            nn.Linear(args.hidden_size, self.vocab_per_rank, bias=False)

    @staticmethod
    def check_tensor_parallel(args: LlamaArgs, size: int) -> None:
        """Each rank takes 1/size of the heads, the key/value heads, the MLP's width and the vocabulary."""
        for n, what in ((args.num_heads, "attention heads"), (args.num_kv_heads, "key/value heads"),
                        (args.intermediate_size, "intermediate size"), (args.vocab_size, "vocabulary")):
            if n % size:
                raise ValueError(f"tensor_parallel_size {size} must divide the model's {what} ({n})")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, D]."""
        pieces = self.pieces(input_ids, positions)
        call = next(pieces)
        while True:
            attention, q, k, v = call
            try:
                call = pieces.send(attention.attend(q, k, v))
            except StopIteration as end:
                return end.value

    def pieces(self, input_ids: torch.Tensor, positions: torch.Tensor,
               qkv_out: tuple[torch.Tensor, ...] | None = None) -> Generator[tuple, torch.Tensor, torch.Tensor]:
        """The forward, stopped at each layer's attention: yields (the layer's Attention, q, k, v), is sent that
        attention's output [T, H, Dh], and returns the final hidden states [T, D]. What runs between two
        attentions treats every token's row on its own, so a runner may pad the batch with rows of its choosing
        and replay these pieces as CUDA graphs, with attention (whose work depends on the batch's sequences)
        run eagerly between them (engine/cuda_graphs.py, MixedGraphs). qkv_out: buffers that every layer's q,
        k, v are written into (a graph's outputs must stay at fixed addresses)."""
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = (layer.input_layernorm(x), x) if residual is None else layer.input_layernorm(x, residual)
            attention = layer.self_attn
            o = yield attention, *attention.project(positions, x, qkv_out)
            x = self._sum_over_ranks(attention.o_proj(o.view(o.shape[0], attention.q_size)))
            x, residual = layer.post_attention_layernorm(x, residual)
            x = self._sum_over_ranks(layer.mlp(x))
        x, _ = self.norm(x, residual)
        return x

    def _sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp is None else self.tp.all_reduce(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        # Each rank holds vocab_per_rank rows: its tokens' rows, zeros for the others, summed over the ranks.
        local = input_ids - self.tp.rank * self.vocab_per_rank
        mine = (local >= 0) & (local < self.vocab_per_rank)
        x = self.embed_tokens(local.clamp(0, self.vocab_per_rank - 1)).masked_fill(~mine[:, None], 0)
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [N, D] (only the rows that sample) -> fp32 logits [N, V] (into `out` if given)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if self.tp is not None:             # each rank's vocabulary slice, side by side
            logits = self.tp.all_gather_columns(logits)
        return logits.float() if out is None else out.copy_(logits)

    # ---- weights -------------------------------------------------------------------------------------------
    def shard_sizes(self, fused: str) -> list[int]:
        """The rows of each checkpoint projection in a fused one, on this rank."""
        a, ranks = self.args, self.tp.size if self.tp else 1
        if fused == "qkv_proj":
            return [a.num_heads * a.head_dim // ranks, a.num_kv_heads * a.head_dim // ranks,
                    a.num_kv_heads * a.head_dim // ranks]
        return [a.intermediate_size // ranks] * 2

    def _rank_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (all of it without tensor parallelism, and for norms)."""
        parts = name.split(".")
        kind = parts[-2] if len(parts) >= 2 else ""
        if self.tp is None or kind not in self.SPLIT_DIM:
            return tensor
        dim = self.SPLIT_DIM[kind]
        size = tensor.shape[dim] // self.tp.size
        return tensor.narrow(dim, self.tp.rank * size, size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face checkpoint tensors into our (fused) parameters; every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            tensor = self._rank_slice(name, tensor)
            proj = name.split(".")[-2] if name.count(".") >= 2 else ""
            if proj in self.FUSED:
                fused, shard = self.FUSED[proj]
                target = name.replace(proj, fused)
                sizes = self.shard_sizes(fused)
                param = params[target].data.narrow(0, sum(sizes[:shard]), sizes[shard])
                loaded.add(f"{target}#{shard}")
            else:
                if name not in params:
                    raise ValueError(f"unexpected checkpoint tensor {name!r}")
                param, target = params[name].data, name
                loaded.add(name)
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
            param.copy_(tensor)
        expected = set()
        for pname in params:
            fused = pname.split(".")[-2] if pname.count(".") >= 2 else ""
            if fused in ("qkv_proj", "gate_up_proj"):
                expected |= {f"{pname}#{i}" for i in range(len(self.shard_sizes(fused)))}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")

    @torch.no_grad()
    def init_dummy_weights(self, seed: int) -> None:
        """Random weights of the real shape (benchmarks): small normal matrices, unit norms, like HF's init."""
        generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=generator)
