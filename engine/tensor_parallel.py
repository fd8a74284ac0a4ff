"""Tensor parallelism: one model split over T processes (one per GPU), Megatron-style, over torch.distributed.

Each rank holds 1/T of every layer: the attention's heads and key/value heads (so 1/T of the KV cache), half of
the MLP's intermediate width per rank for T = 2, 1/T of the vocabulary's embedding rows and LM head. A layer half
ends in one all-reduce (after o_proj, after down_proj); the embedding is an all-reduce of the rows each rank
holds, the logits an all-gather. NCCL between GPUs; gloo on the CPU, so CI runs the same code with 2 processes.

Rank 0, the driver, is the whole engine: scheduler, sequences, sampling, the services' Redis traffic. Ranks
1..T-1, the followers, hold only their shard of the model and of the KV cache: before each forward the driver
tells them what to run (a message on a gloo group: the step's host metadata, as int64s, never pickle) and
broadcasts its device inputs (tokens a step sampled live on the driver's device), and they run the same forward
(the same CUDA graphs) in lockstep, as vLLM's driver worker broadcasts each step's inputs. Only the driver
samples, from logits every rank took part in computing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class Op(IntEnum):
    """What the driver runs next (the follower side is ModelRunner.follow)."""
    STOP = 0
    PREFILL = 1          # a flat batch of chunks: header (T, B, width, max_query_len, max_seq_len), host arrays
    DECODE = 2           # n rows of the device decode batch: header (n, width, max_seq_len); rows broadcast
    LOGITS = 3           # logits of rows of the last prefill's hidden states
    COPY_BLOCKS = 4      # KV blocks copied (a fork's partial block)


class TensorParallel:
    """This process's rank in a group of `size`; the collectives the model needs."""

    def __init__(self, rank: int, size: int, device: torch.device, init_method: str):
        self.rank, self.size, self.device = rank, size, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                device_id=device if device.type == "cuda" else None)
        self.group = dist.group.WORLD
        # Host messages from the driver: gloo, so a follower waits on the host, not on a GPU stream.
        self.control = dist.new_group(backend="gloo") if backend != "gloo" else self.group

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ---- the model's collectives -----------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on each rank -> [N, size * C], rank r's columns at r * C."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # ---- driver -> followers ---------------------------------------------------------------------------------
    def send(self, op: Op, header: list[int] = (), payload: np.ndarray | None = None) -> None:
        """The driver's next op: [op, payload length, *header (up to 6)], then the int64 payload."""
        n = 0 if payload is None else int(payload.size)
        message = torch.zeros(8, dtype=torch.int64)
        message[:2 + len(header)] = torch.tensor([int(op), n, *header], dtype=torch.int64)
        dist.broadcast(message, 0, group=self.control)
        if n:
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(payload, dtype=np.int64)), 0, group=self.control)

    def receive(self) -> tuple[Op, list[int], np.ndarray | None]:
        message = torch.empty(8, dtype=torch.int64)
        dist.broadcast(message, 0, group=self.control)
        op, n, *header = message.tolist()
        payload = None
        if n:
            payload = torch.empty(n, dtype=torch.int64)
            dist.broadcast(payload, 0, group=self.control)
            payload = payload.numpy()
        return Op(op), header, payload

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """A device tensor from the driver, into x on every rank (x contiguous)."""
        dist.broadcast(x, 0, group=self.group)
        return x

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- processes --------------------------------------------------------------------------------------------------
def start_followers(config, hf_config: dict, model_dir: Path | None, size: int) -> tuple[str, list[subprocess.Popen]]:
    """Ranks 1..size-1 as processes of their own (engine/tensor_parallel_follower.py), each given, as JSON on
    stdin, the engine config and the model's (the driver's: a dummy model's vocabulary is sized to its
    tokenizer there). Returns the group's rendezvous and the processes: they exit when the driver sends STOP,
    or when it is gone (their stdin closes)."""
    rendezvous = "file://" + os.path.join(tempfile.mkdtemp(prefix="pagestream-tp-"), "rendezvous")
    message = json.dumps({"config": {k: v for part in asdict(config).values() for k, v in part.items()},
                          "hf_config": hf_config, "model_dir": None if model_dir is None else str(model_dir)})
    followers = []
    for rank in range(1, size):
        process = subprocess.Popen([sys.executable, "-m", "engine.tensor_parallel_follower", str(rank), str(size),
                                    rendezvous],
                                   stdin=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
        process.stdin.write(message.encode() + b"\n")
        process.stdin.flush()
        followers.append(process)
    return rendezvous, followers


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)
