"""Warm-up: a small workload through the model runner before the first real request.

On a GPU the first steps of each kind compile Triton kernels for their shapes (prefill chunks, mixed steps,
decode batches of each size class), and the sampler compiles its variants (greedy, top-p/top-k, penalties,
logprobs). A server that skips this makes its first users wait for the compiler: the first burst after a start
was 40% slower than the next. The worker runs this before it registers, so the server is ready only once warm.

The workload runs through a throwaway Scheduler over the runner's own KV pool: every block it touches is
written again before anything reads it, and the runner forgets its sequences at the end.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from schemas.sampling_params import SamplingParams

# The sampler's paths: greedy, filtered sampling, penalties, logprobs.
_PARAMS = (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05),
           SamplingParams(temperature=1.0, presence_penalty=0.5, repetition_penalty=1.1),
           SamplingParams(temperature=0.0, logprobs=5))


def warm_up(runner: ModelRunner, config: SchedulerConfig, max_model_len: int, eos_token_ids) -> float:
    """Run the warm-up workload; returns its seconds. On a GPU: rounds of prompts of one length each, from a few
    tokens (the prefill kernel picks its query tile by the longest chunk of a step: a step of short chunks alone,
    as prefix-cache hits make them, has a tile of its own) to enough for two full chunks of the token budget,
    with up to 64 sequences decoding through multi-step plans; on the CPU (nothing to compile) two short
    requests of two tokens each, which only check that the warm-up leaves nothing behind: a CPU decode step of
    even the 135M model reads all its weights (~0.15 s), and a restarted worker is not serving while it warms."""
    start = time.perf_counter()
    on_gpu = runner.device.type == "cuda"
    capacity = runner.num_blocks * runner.block_size // 2
    num = min(64 if on_gpu else 2, config.max_num_seqs)
    total = min(2 * config.max_num_batched_tokens if on_gpu else 64, capacity)
    longest = max(1, min(total // num, max_model_len // 2))
    rounds = [(num, longest)]
    output_len = None if on_gpu else 2             # None: a few multi-step plans (see _run)
    if on_gpu:
        rounds = [(2, n) for n in (8, 24, 48, 96) if n < longest] + rounds
    rng = random.Random(0)
    for count, prompt_len in rounds:
        _run(runner, config, max_model_len, eos_token_ids, count, prompt_len, output_len, rng)
    return time.perf_counter() - start


def _run(runner: ModelRunner, config: SchedulerConfig, max_model_len: int, eos_token_ids, num: int,
         prompt_len: int, output_len: int | None, rng: random.Random) -> None:
    """num requests of about prompt_len tokens, each decoding output_len tokens (None: a few multi-step plans,
    the last one cut short), to the end."""
    output_len = max(1, min(output_len or 2 * config.num_scheduler_steps + 3, max_model_len - prompt_len - 1))
    scheduler = Scheduler(replace(config), BlockManager(runner.num_blocks, runner.block_size, False), max_model_len,
                          eos_token_ids)
    vocab = runner.args.vocab_size
    for i in range(num):
        length = rng.randint(max(1, prompt_len // 2), prompt_len)
        params = replace(_PARAMS[i % len(_PARAMS)], max_tokens=output_len, ignore_eos=True, seed=i)
        scheduler.add_request(f"warmup-{i}", [rng.randrange(vocab) for _ in range(length)], params, seed=i)
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        runner.execute(plan, scheduler.update)
        scheduler.cut(plan, runner.steps_run)
    runner.flush()
    runner.seqs.clear()
