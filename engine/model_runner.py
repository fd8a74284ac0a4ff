"""The worker's side of a plan: keep each sequence's tokens and block table, run the model over the paged KV
cache, sample.

The runner never sees the scheduler's objects: it learns sequences from Plan.new, follows them through the
deltas, and appends the tokens it samples itself. In-process the engine hands it Plans directly; the GPU worker
service feeds it the same Plans from Redis.

A plan's first step is built on the host: a flat batch of prompt chunks and decodes (or, when every sequence
decodes, a decode step), its attention run eagerly and the rest of the model replayed as CUDA graphs
(engine/cuda_graphs.py, MixedGraphs). Its remaining k-1 steps decode the sequences that sampled, from a batch kept
on the device (engine/decode_batch.py): each step replays a CUDA graph, samples, and advances the batch with one
kernel, so the host never waits for the GPU inside a plan. Sampled tokens reach the host behind the GPU
(engine/async_output.py).
"""
from __future__ import annotations

import time
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from engine.async_output import StepOutputs
from engine.attention import AttentionMetadata, set_attention_metadata
from engine.block_table import BlockTable, stack_tables
from engine.config import EngineConfig
from engine.cuda_graphs import MIXED_GRAPH_MAX_TOKENS, DecodeGraphs, MixedGraphs
from engine.decode_batch import DecodeBatch
from engine.model_files import resolve_max_model_len
from engine.model_loader import build_model, pick_device, pick_dtype
from engine.models.llama import LlamaArgs, LlamaForCausalLM
from engine.ops import select_ops
from engine.plan import Plan, StepResult, TokenLogprobs
from engine.sampler import Sampler, SamplingBatch, SamplingRow, TokenBitmask
from engine.staging import columns_to_device, to_device
from engine.step_timing import StepTimer
from engine.sequence import FinishReason, check_stop
from engine.structured_output import GrammarState, Grammars, accept_batch, token_bitmask
from engine.tensor_parallel import Op, TensorParallel, rank_device, start_followers
from kernels.advance_step import advance_step, advance_step_reference
from kernels.attention import decode_tile, default_num_splits
from schemas.sampling_params import SamplingParams

CPU_DEFAULT_KV_GB = 2.0
PROMPT_LOGPROBS_ROWS = 1024      # prompt positions whose logits [rows, V] are computed at once, for prompt_logprobs
GPU_RESERVE_BYTES = 1 << 30      # kept free beside the KV pool: CUDA graphs' activations, the sampler's temporaries


@dataclass
class WorkerSequence:
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_table: BlockTable
    params: SamplingParams
    seed: int
    finish: tuple[FinishReason, int | None] | None = None    # ended here (EOS, stop id, length): (reason,
                                                             # stop token), though the scheduler may not know yet
    # prompt_logprobs, chunk by chunk as the prompt is computed (host tensors, ready once a later step's tokens
    # are: the same copy stream): (logprob, rank, top ids, top logprobs) of prompt tokens 1, 2, ...
    prompt_pieces: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    beam: bool = False             # a beam search's: it proposes candidates, the scheduler chooses (BeamStep)
    grammar: GrammarState | None = None                      # structured output: the matcher of its outputs

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Asked for them and not delivered yet (a sequence recomputed after preemption has outputs already)."""
        return self.params.prompt_logprobs is not None and len(self.token_ids) == self.num_prompt_tokens

    def copy(self, seed: int) -> "WorkerSequence":
        return WorkerSequence(list(self.token_ids), self.num_prompt_tokens, self.num_computed_tokens,
                              self.block_table.copy(), self.params, seed, prompt_pieces=list(self.prompt_pieces),
                              grammar=self.grammar.copy() if self.grammar is not None else None)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict, model_dir: Path | None,
                 eos_token_ids: frozenset[int] = frozenset(), progress: bool = True, grammars: Grammars | None = None,
                 follower: tuple[int, str] | None = None):
        """follower: (rank, rendezvous) of a tensor-parallel follower (engine/tensor_parallel.py); the driver
        (rank 0) is built without it and starts its followers itself."""
        mc, sc = config.model, config.scheduler
        self.config = config
        self.device = pick_device(mc.device)
        self.tp: TensorParallel | None = None
        self._followers: list = []
        self._leading = False                     # a driver whose followers run what it runs (once built)
        if mc.tensor_parallel_size > 1:
            LlamaForCausalLM.check_tensor_parallel(LlamaArgs.from_hf_config(hf_config), mc.tensor_parallel_size)
            if follower is None:
                rendezvous, self._followers = start_followers(config, hf_config, model_dir, mc.tensor_parallel_size)
                follower = (0, rendezvous)
            self.device = rank_device(self.device, follower[0])
            self.tp = TensorParallel(follower[0], mc.tensor_parallel_size, self.device, follower[1])
        # The step budget's defaults depend on the device, which is decided here: the engine's scheduler and
        # warm-up read them from the same config.
        config.scheduler = sc = sc.for_device(self.device.type)
        self.dtype = pick_dtype(mc.dtype, hf_config, self.device)
        self.max_model_len = resolve_max_model_len(hf_config, mc.max_model_len)
        self.block_size = config.cache.block_size
        self.eos_token_ids = eos_token_ids
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 1
        self.ops = select_ops(mc.kernel_backend, self.device)
        self.model = build_model(hf_config, model_dir, self.max_model_len, self.device, self.dtype, self.ops,
                                 mc.load_format, mc.seed, progress, self.tp)
        self.args = self.model.args
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads     # this rank's
        self.decode_tile_tokens = decode_tile(self.args.head_dim, self.dtype)[0]    # the splits are counted in these
        self.sampler = Sampler()
        # Structured output's compiled grammars (shared with the input processor in one process); without a
        # tokenizer none compiles, and a constrained sequence that reaches the runner anyway is ended at once.
        self.grammars = grammars or Grammars(None, self.args.vocab_size, eos_token_ids)
        self.seqs: dict[int, WorkerSequence] = {}
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.num_blocks = self._num_kv_blocks()
        # One pool for all layers: [2 (k, v), layers, blocks, block_size, KVH, Dh]; each layer gets views.
        self.kv_cache = torch.zeros(2, self.args.num_layers, self.num_blocks, self.block_size,
                                    self.num_kv_heads, self.args.head_dim, dtype=self.dtype, device=self.device)
        self._attach_kv_cache(self.kv_cache)
        on_gpu = self.device.type == "cuda"
        max_blocks = -(-self.max_model_len // self.block_size)
        self.decode_batch = DecodeBatch(sc.max_num_seqs, max_blocks, self.block_size, self.device)
        if on_gpu and mc.cuda_graphs and self.ops.name == "triton":   # the reference attention plans on the host
            self.graphs = DecodeGraphs(self.model, self.decode_batch, self.max_model_len, self._num_splits)
            self.graphs.capture()
            self.mixed_graphs = MixedGraphs(self.model, min(MIXED_GRAPH_MAX_TOKENS, sc.max_num_batched_tokens),
                                            self.device, self.dtype)
            self.mixed_graphs.capture()
        self.copy_stream = torch.cuda.Stream() if on_gpu else None
        self.async_output = mc.async_output
        self.outputs = StepOutputs(self._commit, self.async_output, self.copy_stream)
        # The last launched step: its sequences, which of them it stepped (None: all), its sampled ids.
        self._inflight: tuple[list[int], list[bool] | None, torch.Tensor] = ([], None, torch.empty(0))
        self.step_timers: list[StepTimer] | None = None      # measure_gpu_time
        self.steps_run = 0                        # steps the last execute() launched (fewer if should_stop cut it)
        self._leading = self.tp is not None and self.tp.is_driver
        self._hidden: torch.Tensor | None = None  # a follower's last prefill hidden states (for Op.LOGITS)

    def _attach_kv_cache(self, kv_cache: torch.Tensor) -> None:
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv_cache[0, i], kv_cache[1, i]

    @property
    def kv_bytes_per_block(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * self.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget()
        else:
            budget = (cache.kv_cache_memory_gb or CPU_DEFAULT_KV_GB) * 1024**3
            # No point holding more than every sequence at full length could use.
            tokens = self.config.scheduler.max_num_seqs * self.max_model_len
            budget = min(budget, -(-tokens // self.block_size) * self.kv_bytes_per_block)
        num_blocks = int(budget // self.kv_bytes_per_block)
        if self.tp is not None:                   # one block table for all ranks: the smallest pool
            num_blocks = self.tp.min(num_blocks)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache: lower max_model_len or raise the memory budget")
        return num_blocks

    @torch.inference_mode()
    def _gpu_kv_budget(self) -> float:
        """gpu_memory_utilization of the device, less what the weights and the largest step need (measured by
        running one: max_num_batched_tokens of prompt, logits and sampling for max_num_seqs rows)."""
        sc = self.config.scheduler
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)    # CUDA context, other processes
        tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * self.max_model_len)
        lengths = [min(self.max_model_len - 1, tokens - t) for t in range(0, tokens, self.max_model_len - 1)]
        blocks = sum(-(-n // self.block_size) for n in lengths)
        scratch = torch.zeros(2, self.args.num_layers, blocks, self.block_size, self.num_kv_heads,
                              self.args.head_dim, dtype=self.dtype, device=self.device)
        self._attach_kv_cache(scratch)
        torch.cuda.reset_peak_memory_stats(self.device)
        chunks, first = [], 0
        for n in lengths:
            count = -(-n // self.block_size)
            chunks.append((np.arange(first, first + count, dtype=np.int32), [0] * n, 0))
            first += count
        hidden = self._forward_prefill(chunks)
        rows = min(sc.max_num_seqs, hidden.shape[0])
        logits = self.model.compute_logits(hidden[:rows])
        self.sampler(logits, SamplingBatch.from_rows([SamplingRow(_PROFILE_PARAMS, 0, [0], 1)] * rows,
                                                     self.args.vocab_size, (), self.device))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        del scratch, hidden, logits
        torch.cuda.empty_cache()

        return total * self.config.cache.gpu_memory_utilization - others - peak - GPU_RESERVE_BYTES

    def _num_splits(self, batch: int, max_seq_len: int) -> int:
        return default_num_splits(batch, self.num_kv_heads, max_seq_len, self.decode_tile_tokens, self.num_sms)

    def measure_gpu_time(self, on: bool = True) -> None:
        """Record a pair of CUDA events around every step (for the GPU-busy figure of the benchmark)."""
        self.step_timers = [] if on and self.device.type == "cuda" else None

    # ---- one plan ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: Plan, on_step: Callable[[StepResult], None] | None = None,
                on_done: Callable[[int], None] | None = None,
                should_stop: Callable[[], bool] | None = None, may_skip: bool = False) -> list[StepResult]:
        """Launch the plan's steps. Each step's StepResult goes to on_step once its tokens are on the host, in
        launch order, and on_done(steps run) runs after the plan's last one. Returns the results processed
        during this call. Sequences that end inside the plan sit out the steps after (the scheduler, a plan
        behind, may still schedule them: they are skipped, or their tokens dropped).

        should_stop is asked before every step after the first: True ends the plan there (new prompts are
        waiting), and steps_run says how many steps ran, for Scheduler.cut. may_skip: asked before the first step
        too, when the plan only decodes sequences already held: True then runs none of it (steps_run 0; its block
        tables and frees still apply). The worker service skips so a plan of decode steps made before a prompt
        arrived, waiting ahead of the plan that admits it, does not make that prompt wait a step longer.

        With asynchronous output the plan's last step is left on the GPU: it is processed once the next plan's
        first step is launched (or by flush()), so the GPU does not wait while the host plans. So is the step
        before it, but committed when the next plan starts (catch_up; engine/async_output.py says why). A decode
        step can be launched before the tokens it consumes reach the host: they are taken from the device."""
        self.outputs.asynchronous = self.async_output
        self.steps_run = 0
        self.catch_up()
        inflight = self._inflight_rows()
        if any(s in inflight for s in plan.freed_seq_ids):
            self.flush()          # a preempted sequence's last token is still owed to the scheduler
            inflight = {}
        elif self.outputs.holds_any(plan.freed_seq_ids):
            self.outputs.report_held()      # while the sequences they name are still held here
        self._apply(plan)
        live = {s: n for s, n in plan.num_scheduled_tokens.items() if not self.seqs[s].finished}
        # Tokens each sequence has, counting the one its last launched step is sampling.
        known = {s: len(self.seqs[s].token_ids) + (s in inflight) for s in live}
        decoding = bool(live) and not plan.forks and all(
            n >= 1 and self.seqs[s].num_computed_tokens + 1 == known[s] for s, n in live.items())
        if decoding and may_skip and not plan.new and should_stop is not None and should_stop():
            pass                  # steps_run stays 0: the scheduler takes every step back (Scheduler.cut)
        elif decoding:
            rows = self._longest_first(live)
            self.steps_run = self._decode(rows, [live[s] - 1 for s in rows], *self._last_tokens(rows, inflight),
                                          on_step, should_stop)
        elif live:
            if plan.forks:        # a fork child copies every token of its parent: they must all be on the host
                self.flush()
                inflight = {}
                live = {s: n for s, n in live.items() if not self.seqs[s].finished}
            # Built on the host while the GPU still runs the last step: a decode row whose input token that
            # step is sampling takes it from the device.
            first = {s: min(n, known[s] - self.seqs[s].num_computed_tokens) for s, n in live.items()}
            sampled = self._eager_step(first, inflight, plan, on_step)
            self.steps_run = 1
            rows = self._longest_first(s for s in sampled if s in live and live[s] - first[s] > 0)
            if rows and not (should_stop is not None and should_stop()):
                self.steps_run += self._decode(rows, [live[s] - first[s] - 1 for s in rows],
                                               *self._last_tokens(rows, self._inflight_rows()), on_step, should_stop)
        if on_done is not None:
            steps = self.steps_run
            self.outputs.push_done(lambda: on_done(steps))
        if not self.async_output or not live:
            self.flush()
        return self.outputs.take_results()

    def flush(self) -> None:
        """Process every launched step (waits for the GPU)."""
        self.outputs.drain()

    def catch_up(self) -> None:
        """Commit the launched steps but the last, so self.seqs is what the next plan is built on (a plan's last
        launch leaves the step before it too); their reports wait for the next launch."""
        self.outputs.catch_up()

    @property
    def has_pending_outputs(self) -> bool:
        return bool(self.outputs.pending)

    @property
    def pending_outputs_on_host(self) -> bool:
        """Whether every launched step has finished on the GPU (flush() would not wait)."""
        return self.outputs.on_host()

    def _inflight_rows(self) -> dict[int, int]:
        """Sequence -> its row in the last launched step, for the steps whose tokens are not on the host yet."""
        if not self.outputs.pending:
            return {}
        seq_ids, active, _ = self._inflight
        return {s: b for b, s in enumerate(seq_ids) if active is None or active[b]}

    def _last_tokens(self, rows: list[int], inflight: dict[int, int]):
        """Each row's input token for a decode step, and the mask of those still on the device (from the last
        step, which the sampler's counters must include); (host ids, None) when all are on the host."""
        step_rows = [inflight.get(s, -1) for s in rows]          # one look a row: this runs every plan
        host = [self.seqs[s].token_ids[-1] if b < 0 else 0 for s, b in zip(rows, step_rows)]
        if max(step_rows, default=-1) < 0:
            return host, None
        where, host_ids = columns_to_device([(step_rows, torch.int64), (host, torch.int64)], self.device)
        on_device = where >= 0
        sampled = self._inflight[2][where.clamp(min=0)]
        return torch.where(on_device, sampled, host_ids), on_device

    def _longest_first(self, seq_ids: Iterable[int]) -> list[int]:
        """Decode rows, the longest context first, as the decode attention kernel wants them (kernels/attention.py
        says why). Sorted once a plan: every row that steps grows by one token a step, so the order holds."""
        return sorted(seq_ids, key=lambda s: self.seqs[s].num_computed_tokens, reverse=True)

    def _decode(self, rows: list[int], steps_left: list[int], input_ids, pending_mask, on_step, should_stop) -> int:
        """Decode steps for `rows` from the device batch: the first computes input_ids (host ids, or a device
        tensor of what earlier steps sampled), and row b goes on for steps_left[b] more steps, unless
        should_stop() ends them at a step boundary. Rows whose input token is not on the host yet (pending_mask;
        all of them when input_ids is on the device and the mask is None) have it counted by the sampler from
        the device. Returns the number of steps launched."""
        seqs = [self.seqs[s] for s in rows]
        batch = self.decode_batch
        batch.load(rows, [s.num_computed_tokens for s in seqs], [s.block_table for s in seqs], steps_left, input_ids)
        sampling = SamplingBatch.from_rows([_sampling_row(s) for s in seqs], self.args.vocab_size,
                                           self.eos_token_ids, self.device)
        if isinstance(input_ids, torch.Tensor):
            sampling.advance(input_ids, pending_mask)
        constrained = any(s.grammar is not None for s in seqs)
        steps = 1 + max(steps_left)
        for step in range(steps):
            if step > 0 and should_stop is not None and should_stop():
                return step
            if step > 0:
                batch.advance(out.token_ids, advance_step if self.ops.name == "triton" else advance_step_reference)
            active = [batch.active(b) for b in range(len(rows))]
            for seq, on in zip(seqs, active):
                seq.num_computed_tokens += on
            opens_plan = step == 0 and self.steps_run == 0      # no eager step of this plan before it
            timer = self._start_timer(opens_plan)
            logits = self._decode_forward(len(rows))
            if constrained:           # after the forward's launch: see _token_bitmask
                sampling.token_bitmask = self._token_bitmask(rows, active)
            out = self.sampler(logits, sampling)
            self._stop_timer(timer, eager=False)
            sampling.advance(out.token_ids)
            # The plan's last step, after another of this plan (an earlier decode step, or its eager step).
            leave_previous = step == steps - 1 and not opens_plan
            self.outputs.push(rows, active, out, on_step, leave_previous)
            self._inflight = (rows, active, out.token_ids)
        return steps

    def _token_bitmask(self, seq_ids: list[int], active: list[bool] | None = None) -> TokenBitmask | None:
        """Structured output: the bitmask of the step about to sample seq_ids (row b: seq_ids[b]; rows not
        active are left free), or None when no row is constrained (the sampler then skips the stage).

        Each matcher first accepts every token its sequence sampled before this step: those on the host, and the
        one the last launched step sampled, if that step's ids are still on their way. Multi-step plans stay
        asynchronous: this runs once the step's forward is launched, and waits for the last step's sampled ids
        only (their copy, on the side stream), not for the forward. So the matchers advance and the bitmask is
        filled while the GPU runs the forward; the bitmask goes to the device behind it (pinned, non-blocking),
        and only this step's sampler waits for it. vLLM falls back to one step per plan with grammars; here a
        batch with constrained rows keeps its k steps, and one without any pays nothing. The host cannot run
        more than a step ahead of the GPU while constrained rows decode: it needs each step's tokens before it
        launches the next sampler."""
        rows = [b for b, s in enumerate(seq_ids) if self.seqs[s].grammar is not None and not self.seqs[s].finished
                and (active is None or active[b])]
        if not rows:
            return None
        inflight = self._inflight_rows()
        states, waiting = [], []
        for b in rows:
            seq = self.seqs[seq_ids[b]]
            state = seq.grammar
            states.append(state)
            committed = len(seq.token_ids) - seq.num_prompt_tokens
            if state.num_seen < committed:
                state.accept(seq.token_ids[seq.num_prompt_tokens + state.num_seen:])
            if state.num_seen == committed and seq_ids[b] in inflight:
                waiting.append((state, inflight[seq_ids[b]]))
        if waiting:
            sampled = self.outputs.newest_tokens().tolist()
            accept_batch([state for state, _ in waiting], [sampled[row] for _, row in waiting])
        return token_bitmask(states, rows, self.args.vocab_size, self.eos_token_ids, self.device)

    def _decode_forward(self, n: int) -> torch.Tensor:
        b = self.decode_batch
        if self._leading:
            self.tp.send(Op.DECODE, [n, b.width])
            self.tp.broadcast(b.rows(n))
        if self.graphs is not None:
            return self.graphs.run(n)
        seq_lens = [p + 1 for p in b.positions_host]
        md = AttentionMetadata(
            slot_mapping=b.slot_mapping[:n], query_start_loc=b.query_start_loc[:n + 1], seq_lens=b.seq_lens[:n],
            block_tables=b.block_tables[:n], max_query_len=1, max_seq_len=max(seq_lens),
            query_lens_cpu=[1] * n, seq_lens_cpu=seq_lens, decode_only=True,
            num_splits=self._num_splits(n, max(seq_lens)))
        set_attention_metadata(md)
        try:
            return self.model.compute_logits(self.model(b.input_ids[:n], b.positions[:n]))
        finally:
            set_attention_metadata(None)

    def _eager_step(self, counts: dict[int, int], inflight: dict[int, int], plan: Plan,
                    on_step) -> list[int]:
        """One forward over counts[s] tokens of each sequence s (prompt chunks and decodes, built on the host),
        then a token for each sequence that reached its last token, and for each fork child (returned: the
        sequences that sampled). A sequence in `inflight` is a decode row whose input token the last launched
        step is still sampling."""
        timer = self._start_timer(opens_plan=True)      # a plan's eager step is its first
        seqs = {s: self.seqs[s] for s in counts}
        chunks, flat_rows, step_rows, row = [], [], [], 0
        for seq_id, seq in seqs.items():
            start, n = seq.num_computed_tokens, counts[seq_id]
            if seq_id in inflight:
                assert n == 1, "a sequence whose token is in flight computes that token next"
                flat_rows.append(row)
                step_rows.append(inflight[seq_id])
                chunks.append((seq.block_table, [0], start))
            else:
                chunks.append((seq.block_table, seq.token_ids[start:start + n], start))
            row += n
        hidden = self._forward_prefill(chunks, (flat_rows, step_rows) if flat_rows else None)
        self._prompt_logprobs(hidden, counts, inflight)
        samplers, row = [], 0
        for seq_id, n in counts.items():
            seq = seqs[seq_id]
            seq.num_computed_tokens += n
            row += n
            if seq.num_computed_tokens == len(seq.token_ids) + (seq_id in inflight):   # reached its last token
                samplers.append((seq_id, row - 1))
        # A fork child samples from its parent's last position, with its own seed.
        row_of = dict(samplers)
        for fork in plan.forks:
            self.seqs[fork.child_id] = self.seqs[fork.parent_id].copy(fork.seed)
            samplers.append((fork.child_id, row_of[fork.parent_id]))
        seq_ids = [s for s, _ in samplers]
        if not samplers:
            self._stop_timer(timer, eager=True)
            return []
        logits = self._logits(hidden, [r for _, r in samplers])
        sampling = SamplingBatch.from_rows([_sampling_row(self.seqs[s]) for s in seq_ids], self.args.vocab_size,
                                           self.eos_token_ids, self.device)
        last_tokens, on_device = self._last_tokens(seq_ids, inflight)
        if on_device is not None:       # the sampler counts the in-flight tokens the host has not seen yet
            sampling.advance(last_tokens, on_device)
        sampling.token_bitmask = self._token_bitmask(seq_ids)
        out = self.sampler(logits, sampling)
        self._stop_timer(timer, eager=True)
        self.outputs.push(seq_ids, None, out, on_step)
        self._inflight = (seq_ids, None, out.token_ids)
        return seq_ids

    def _prompt_logprobs(self, hidden: torch.Tensor, counts: dict[int, int], inflight: dict[int, int]) -> None:
        """prompt_logprobs of the prompt tokens this step's chunks predict (position p's logits score token p+1),
        for the sequences that asked: appended to their prompt_pieces, on their way to the host. Only these rows'
        logits are computed, PROMPT_LOGPROBS_ROWS at a time."""
        rows, targets, owners, row = [], [], [], 0
        for seq_id, n in counts.items():
            seq = self.seqs[seq_id]
            start = seq.num_computed_tokens
            if seq_id not in inflight and seq.wants_prompt_logprobs:
                m = max(0, min(n, seq.num_prompt_tokens - 1 - start))      # the last prompt token predicts output
                rows += range(row, row + m)
                targets += seq.token_ids[start + 1:start + 1 + m]
                owners.append((seq, m))
            row += n
        if not rows:
            return
        k = max(seq.params.prompt_logprobs for seq, _ in owners)
        vocab = self.args.vocab_size
        parts = []
        for first in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            target = to_device(targets[first:first + PROMPT_LOGPROBS_ROWS], torch.int64, self.device)
            logits = self._logits(hidden, rows[first:first + PROMPT_LOGPROBS_ROWS])
            logprobs = logits[:, :vocab].float().log_softmax(dim=-1)                                  # [m, V]
            chosen = logprobs.gather(1, target[:, None])                                              # [m, 1]
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)
            parts.append((chosen.squeeze(1), (logprobs > chosen).sum(dim=-1) + 1, top_ids, top_logprobs))
        columns = [torch.cat(column) for column in zip(*parts)] if len(parts) > 1 else list(parts[0])
        at = 0
        for seq, m in owners:
            if m:
                piece = [c[at:at + m] for c in columns]
                seq.prompt_pieces.append(tuple(self.outputs.to_host(piece)))
            at += m

    def _forward_prefill(self, chunks: list[tuple[BlockTable | np.ndarray, list[int], int]],
                         from_device: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
        """Hidden states [T, D] of a flat batch of chunks (block table, the chunk's token ids, its first
        position). from_device: (flat rows, rows of the last launched step) whose input token is that step's
        sampled one, still on the device (its place in the chunk's token ids is a placeholder)."""
        n, bs, dev = len(chunks), self.block_size, self.device
        query_lens = np.fromiter((len(tokens) for _, tokens, _ in chunks), np.int64, n)
        starts = np.fromiter((start for _, _, start in chunks), np.int64, n)
        seq_lens = starts + query_lens
        tables = np.empty((n, max(len(table) for table, _, _ in chunks)), np.int32)
        stack_tables([table for table, _, _ in chunks], tables)
        query_start_loc = np.zeros(n + 1, np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        row = np.repeat(np.arange(n), query_lens)                     # each token's chunk
        positions = np.arange(query_start_loc[-1]) - query_start_loc[row] + starts[row]
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        input_ids = to_device(list(chain.from_iterable(tokens for _, tokens, _ in chunks)), torch.int64, dev)
        if from_device is not None:
            flat_rows, step_rows = (to_device(x, torch.int64, dev) for x in from_device)
            input_ids[flat_rows] = self._inflight[2][step_rows]
        if self._leading:
            self.tp.send(Op.PREFILL, [len(positions), n, tables.shape[1]],
                         np.concatenate([positions, slots, query_start_loc, seq_lens, tables.ravel()]))
            self.tp.broadcast(input_ids)
        return self._prefill(input_ids, positions, slots, query_start_loc, seq_lens, tables)

    def _prefill(self, input_ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray,
                 query_start_loc: np.ndarray, seq_lens: np.ndarray, tables: np.ndarray) -> torch.Tensor:
        """The forward of a flat batch, its inputs on the device and its layout on the host: hidden [T, D]."""
        dev = self.device
        query_lens = np.diff(query_start_loc)
        md = AttentionMetadata(
            slot_mapping=to_device(slots, torch.int64, dev),
            query_start_loc=to_device(query_start_loc, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(tables, torch.int32, dev),
            max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
            query_lens_cpu=query_lens.tolist(), seq_lens_cpu=seq_lens.tolist())
        positions = to_device(positions, torch.int64, dev)
        set_attention_metadata(md)
        try:
            if self.mixed_graphs is not None and len(positions) <= self.mixed_graphs.max_tokens:
                return self.mixed_graphs.run(input_ids, positions)
            return self.model(input_ids, positions)
        finally:
            set_attention_metadata(None)

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """fp32 logits [len(rows), V] of these rows of a prefill's hidden states."""
        if self._leading:
            self.tp.send(Op.LOGITS, payload=np.asarray(rows, np.int64))
        return self.model.compute_logits(hidden[to_device(rows, torch.int64, self.device)])

    def _copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if self._leading:
            self.tp.send(Op.COPY_BLOCKS, payload=np.asarray(src + dst, np.int64))
        src, dst = to_device(src, torch.int64, self.device), to_device(dst, torch.int64, self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    # ---- tensor parallelism ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def follow(self) -> None:
        """A follower's loop: run each forward the driver announces, in lockstep with it (the collectives inside
        the model pair them up), until it stops."""
        while True:
            op, header, payload = self.tp.receive()
            if op == Op.STOP:
                break
            if op == Op.PREFILL:
                T, B, width = header[:3]
                positions, slots, query_start_loc, seq_lens, tables = np.split(payload, np.cumsum([T, T, B + 1, B]))
                input_ids = self.tp.broadcast(torch.empty(T, dtype=torch.int64, device=self.device))
                self._hidden = self._prefill(input_ids, positions, slots, query_start_loc, seq_lens,
                                             tables.reshape(B, width))
            elif op == Op.DECODE:
                n, width = header[:2]
                rows = self.tp.broadcast(torch.empty(n * (4 + width), dtype=torch.int64, device=self.device))
                self.decode_batch.set_rows(n, width, rows)
                if self.graphs is None:           # the eager decode plans its attention on the host
                    self.decode_batch.positions_host = rows[n:2 * n].tolist()
                self._decode_forward(n)
            elif op == Op.LOGITS:
                self._logits(self._hidden, payload.tolist())
            elif op == Op.COPY_BLOCKS:
                src, dst = np.split(payload, 2)
                self._copy_blocks(src.tolist(), dst.tolist())
        self.tp.close()

    def close(self) -> None:
        """Stop the tensor-parallel followers (nothing to do without them)."""
        if self._leading:
            self.tp.send(Op.STOP)
            self._leading = False
            self.tp.close()               # before waiting: NCCL's teardown is collective, the followers are in it
            for process in self._followers:
                process.wait()

    def _commit(self, seq_ids: list[int], active: list[bool] | None, tokens: list[int], logprobs) -> StepResult:
        """A step's tokens, now on the host: append them, check stops, and report what belongs to whom."""
        result = StepResult([], [], [] if logprobs is not None else None)
        for i, (seq_id, token) in enumerate(zip(seq_ids, tokens)):
            seq = self.seqs.get(seq_id)
            if seq is None or seq.finished or (active is not None and not active[i]):
                continue
            if not seq.beam:
                seq.token_ids.append(token)
                seq.finish = check_stop(seq.params, token, len(seq.token_ids) - seq.num_prompt_tokens,
                                        len(seq.token_ids), self.eos_token_ids, self.max_model_len)
            result.seq_ids.append(seq_id)
            result.token_ids.append(token)
            if logprobs is not None:
                lp = logprobs[i]
                result.logprobs.append(TokenLogprobs(lp.logprob, lp.top[:seq.params.logprobs or 0]))
            if seq.params.prompt_logprobs is not None and len(seq.token_ids) == seq.num_prompt_tokens + 1:
                result.prompt_logprobs[seq_id] = _prompt_entries(seq.prompt_pieces, seq.params.prompt_logprobs)
                seq.prompt_pieces = []
        return result

    def _start_timer(self, opens_plan: bool):
        if self.step_timers is None:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start, time.perf_counter(), opens_plan

    def _stop_timer(self, timer, eager: bool) -> None:
        if timer is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            start, launched, opens_plan = timer
            self.step_timers.append(StepTimer(start, end, eager, launched, opens_plan))

    def _apply(self, plan: Plan) -> None:
        # New beams copy their parents before any parent takes its own next token (or is freed).
        for step in sorted(plan.beam_steps, key=lambda b: b.seq_id == b.parent_id):
            parent = self.seqs[step.parent_id]
            tokens = parent.token_ids[:parent.num_computed_tokens] + [step.token_id]
            if step.seq_id == step.parent_id:
                parent.token_ids = tokens
            else:
                self.seqs[step.seq_id] = WorkerSequence(tokens, parent.num_prompt_tokens, parent.num_computed_tokens,
                                                        parent.block_table.copy(), parent.params, parent.seed,
                                                        beam=True)
        for seq_id in plan.freed_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in plan.new:
            # A preempted sequence comes back with its outputs: its new matcher accepts them before it samples.
            spec = new.params.structured_outputs
            self.seqs[new.seq_id] = WorkerSequence(list(new.token_ids), new.num_prompt_tokens,
                                                   new.num_computed_tokens, BlockTable(new.block_ids), new.params,
                                                   new.seed, beam=new.beam, grammar=None if spec is None else
                                                   self.grammars.state(spec))
        for run in plan.running:
            self.seqs[run.seq_id].block_table.replace_from(run.block_offset, run.new_block_ids)
        if plan.block_copies:
            src, dst = zip(*plan.block_copies)
            self._copy_blocks(list(src), list(dst))


_PROFILE_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)


def _prompt_entries(pieces: list[tuple[torch.Tensor, ...]], k: int) -> list[TokenLogprobs]:
    entries = []
    for chosen, ranks, top_ids, top_logprobs in pieces:
        for lp, rank, ids, lps in zip(chosen.tolist(), ranks.tolist(), top_ids[:, :k].tolist(),
                                      top_logprobs[:, :k].tolist()):
            entries.append(TokenLogprobs(lp, list(zip(ids, lps)), rank))
    return entries


def _sampling_row(seq: WorkerSequence) -> SamplingRow:
    return SamplingRow(seq.params, seq.seed, seq.token_ids, seq.num_prompt_tokens)



