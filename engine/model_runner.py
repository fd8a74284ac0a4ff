"""The worker's side of a step: keep each sequence's tokens and block table, turn a Plan into one flat batch,
run the model over the paged KV cache, sample.

The runner never sees the scheduler's objects: it learns sequences from Plan.new, follows them through the
deltas, and appends the tokens it samples itself. In-process the engine hands it Plans directly; the GPU worker
service feeds it the same Plans from Redis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from engine.attention import AttentionMetadata, set_attention_metadata
from engine.config import EngineConfig
from engine.model_files import resolve_max_model_len
from engine.model_loader import build_model, pick_device, pick_dtype
from engine.plan import Plan, StepResult, TokenLogprobs
from engine.sampler import Sampler, SamplingBatch, SamplingRow
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, check_stop

CPU_DEFAULT_KV_GB = 2.0


@dataclass
class WorkerSequence:
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    params: SamplingParams
    seed: int
    finish: tuple[FinishReason, int | None] | None = None    # ended here (EOS, stop id, length): (reason,
                                                             # stop token), though the scheduler may not know yet

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def copy(self, seed: int) -> "WorkerSequence":
        return WorkerSequence(list(self.token_ids), self.num_prompt_tokens, self.num_computed_tokens,
                              list(self.block_ids), self.params, seed)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict, model_dir: Path | None,
                 eos_token_ids: frozenset[int] = frozenset(), progress: bool = True):
        mc = config.model
        self.config = config
        self.device = pick_device(mc.device)
        self.dtype = pick_dtype(mc.dtype, hf_config, self.device)
        self.max_model_len = resolve_max_model_len(hf_config, mc.max_model_len)
        self.block_size = config.cache.block_size
        self.eos_token_ids = eos_token_ids
        self.model = build_model(hf_config, model_dir, self.max_model_len, self.device, self.dtype,
                                 mc.load_format, mc.seed, progress)
        self.args = self.model.args
        self.num_blocks = self._num_kv_blocks()
        # One pool for all layers: [2 (k, v), layers, blocks, block_size, KVH, Dh]; each layer gets views.
        self.kv_cache = torch.zeros(2, self.args.num_layers, self.num_blocks, self.block_size,
                                    self.args.num_kv_heads, self.args.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.sampler = Sampler()
        self.seqs: dict[int, WorkerSequence] = {}

    @property
    def kv_bytes_per_block(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cache.gpu_memory_utilization) * total
        else:
            budget = (cache.kv_cache_memory_gb or CPU_DEFAULT_KV_GB) * 1024**3
            # No point holding more than every sequence at full length could use.
            tokens = self.config.scheduler.max_num_seqs * self.max_model_len
            budget = min(budget, -(-tokens // self.block_size) * self.kv_bytes_per_block)
        num_blocks = int(budget // self.kv_bytes_per_block)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache: lower max_model_len or raise the memory budget")
        return num_blocks

    # ---- one plan ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: Plan, on_step: Callable[[StepResult], None] | None = None) -> list[StepResult]:
        """Run the plan's steps; one StepResult per step, each also handed to on_step as soon as it exists.
        Sequences that end inside the plan sit out the steps after (the scheduler, a plan behind, may still
        schedule them: they are skipped)."""
        self._apply(plan)
        live = {s: n for s, n in plan.num_scheduled_tokens.items() if not self.seqs[s].finished}
        if not live:
            return []
        first = {s: min(n, len(self.seqs[s].token_ids) - self.seqs[s].num_computed_tokens) for s, n in live.items()}
        left = {s: live[s] - first[s] for s in live}
        results, counts = [], first
        for step in range(plan.num_steps):
            if not counts:
                break
            results.append(self._step(counts, plan if step == 0 else None))
            if on_step is not None:
                on_step(results[-1])
            counts = {s: 1 for s, n in left.items() if n > 0 and not self.seqs[s].finished}
            for s in counts:
                left[s] -= 1
        return results

    def _step(self, counts: dict[int, int], plan: Plan | None = None) -> StepResult:
        """One forward over counts[s] tokens of each sequence s, then a token for each that reached its end."""
        if not counts:
            return StepResult()
        input_ids, positions, slots, query_lens, seq_lens, tables, samplers = [], [], [], [], [], [], []
        bs = self.block_size
        for seq_id, n in counts.items():
            seq = self.seqs[seq_id]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(seq.block_ids)
            seq.num_computed_tokens = end
            if end == len(seq.token_ids):           # reached its last token: this sequence samples
                samplers.append((seq_id, len(input_ids) - 1))
        # A fork child samples from its parent's last position, with its own seed.
        row_of = dict(samplers)
        for fork in plan.forks if plan else ():
            self.seqs[fork.child_id] = self.seqs[fork.parent_id].copy(fork.seed)
            samplers.append((fork.child_id, row_of[fork.parent_id]))

        dev = self.device
        max_blocks = max(map(len, tables))
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0] + _cumsum(query_lens), dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32,
                                      device=dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        set_attention_metadata(md)
        try:
            hidden = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev))
        finally:
            set_attention_metadata(None)
        if not samplers:
            return StepResult()
        seq_ids = [s for s, _ in samplers]
        logits = self.model.compute_logits(hidden[torch.tensor([r for _, r in samplers], device=dev)])
        return self._sample(seq_ids, logits)

    def _apply(self, plan: Plan) -> None:
        for seq_id in plan.freed_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in plan.new:
            self.seqs[new.seq_id] = WorkerSequence(list(new.token_ids), new.num_prompt_tokens,
                                                   new.num_computed_tokens, list(new.block_ids), new.params,
                                                   new.seed)
        for run in plan.running:
            table = self.seqs[run.seq_id].block_ids
            del table[run.block_offset:]
            table += run.new_block_ids
        if plan.block_copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*plan.block_copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _sample(self, seq_ids: list[int], logits: torch.Tensor) -> StepResult:
        rows = []
        for seq_id in seq_ids:
            s = self.seqs[seq_id]
            rows.append(SamplingRow(s.params, s.seed, s.token_ids[:s.num_prompt_tokens],
                                    s.token_ids[s.num_prompt_tokens:]))
        batch = SamplingBatch.from_rows(rows, self.args.vocab_size, self.eos_token_ids, self.device)
        out = self.sampler(logits, batch)
        token_ids = out.token_ids.tolist()
        for seq_id, token in zip(seq_ids, token_ids):
            seq = self.seqs[seq_id]
            seq.token_ids.append(token)
            seq.finish = check_stop(seq.params, token, len(seq.token_ids) - seq.num_prompt_tokens,
                                    len(seq.token_ids), self.eos_token_ids, self.max_model_len)
        logprobs = None
        if out.logprobs is not None:
            sampled, top_ids, top_lps = out.logprobs.tolist(), out.top_token_ids.tolist(), out.top_logprobs.tolist()
            logprobs = [TokenLogprobs(lp, list(zip(ids[:row.params.logprobs or 0], lps[:row.params.logprobs or 0])))
                        for row, lp, ids, lps in zip(rows, sampled, top_ids, top_lps)]
        return StepResult(seq_ids, token_ids, logprobs)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
