"""HostStalls counts what stalls the model loop on the host; after the warm-up, serving compiles no Triton kernel.

The collector's passes are counted everywhere. Compilations only happen on a GPU (Triton's interpreter compiles
nothing), so those tests run there (scripts/gpu_suite.sh tests): a new kernel's compilation is seen by name, and
the warm-up leaves nothing to compile for the shapes a served load meets on the Llama-3.2-1B shape in bf16.
"""
from __future__ import annotations

import gc
import random

import pytest
import torch
import triton

from engine.host_stalls import HostStalls

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="Triton compiles kernels only on a GPU (its interpreter compiles none)")


def test_collector_passes_are_counted_by_generation_and_the_hooks_put_back():
    runtime = triton.knobs.runtime
    before = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
    gc.disable()                                   # only the passes asked for here
    try:
        with HostStalls() as stalls:
            assert runtime.jit_cache_hook is not before[0]
            gc.collect(0)
            gc.collect(2)
        gc.collect()                               # after the block: not counted
    finally:
        gc.enable()
    assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == before
    assert stalls.gc_passes == [1, 0, 1] and all(s >= 0 for s in stalls.gc_seconds)
    figures = stalls.figures()
    assert figures["compiled"] == [] and figures["compile_s"] == 0 and figures["gc_passes"] == [1, 0, 1]
    if not torch.cuda.is_initialized():
        assert figures["cuda"] is None and "CUDA" not in stalls.text()
    assert stalls.text().startswith("host stalls: Triton compiled nothing; garbage collector: gen0 1 in ")


@needs_gpu
def test_a_new_kernel_is_seen_compiling_by_name_and_an_earlier_hook_still_runs():
    import triton.language as tl

    @triton.jit
    def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    runtime = triton.knobs.runtime
    earlier = []
    runtime.jit_post_compile_hook = lambda **kwargs: earlier.append(kwargs["fn"].name)
    try:
        x = torch.zeros(100, device="cuda")
        logged = []
        with HostStalls(on_compile=lambda *args: logged.append(args)) as stalls:
            _add_one_kernel[(1,)](x, 100, BLOCK=128)
            _add_one_kernel[(1,)](x, 100, BLOCK=128)          # compiled already: nothing new
            _add_one_kernel[(1,)](x, 100, BLOCK=256)          # a new constexpr: a new variant
        torch.cuda.synchronize()
    finally:
        runtime.jit_post_compile_hook = None
    assert x.eq(3).all()
    names = [name for name, _, _ in stalls.compiled]
    assert names == [_add_one_kernel.fn.__qualname__] * 2          # BLOCK=128 once, BLOCK=256 once
    assert earlier == names and [name for name, _, _ in logged] == names
    assert all(seconds > 0 for _, seconds, _ in stalls.compiled)
    assert "_add_one_kernel" in stalls.compiled[1][2]               # Triton's description of the variant
    assert "Triton compiled 2 kernels" in stalls.text()
    cuda = stalls.figures()["cuda"]                # the allocators, counted once CUDA is in use
    assert set(cuda) == {"device_segments", "alloc_retries", "pinned_blocks", "pinned_alloc_ms"}
    assert all(v >= 0 for v in cuda.values()) and "device segments allocated" in stalls.text()


@needs_gpu
def test_after_the_warm_up_a_served_load_compiles_nothing():
    """The Llama-3.2-1B shape in bf16, as `bench pipeline-1b` serves it: the warm-up, then the loads a server
    meets (a burst of 256 prompts of 128-1024 tokens, prompts sharing a prefix so that prefix-cache hits leave
    short chunks, arrivals at a steady rate into running decodes, sampled requests) must compile no kernel."""
    from dataclasses import replace

    from engine.llm import LLM
    from engine.warmup import warm_up
    from loadtest.datasets import SampleRequest
    from loadtest.pipeline import offline_load
    from schemas.sampling_params import SamplingParams

    llm = LLM("llama-3.2-1b", load_format="dummy", progress=False, num_blocks=16384)   # 262k tokens: all fit
    engine = llm.engine
    warm_up(engine.runner, engine.config.scheduler, engine.max_model_len, engine.scheduler.eos_token_ids)
    rng = random.Random(0)
    vocab = engine.runner.args.vocab_size

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]
    burst = [SampleRequest(tokens(n), n, rng.randint(16, 64)) for n in (rng.randint(128, 1024) for _ in range(256))]
    prefix = tokens(512)
    shared = [SampleRequest(prefix + tokens(n), 512 + n, 16) for n in (rng.randint(1, 40) for _ in range(48))]
    steady = [replace(r, prompt=[7] + r.prompt) for r in burst[:64]]
    with HostStalls() as stalls:
        offline_load(engine, burst, float("inf"))
        offline_load(engine, shared, float("inf"))
        offline_load(engine, steady, 32.0)
        llm.generate([r.prompt for r in burst[:32]],
                     [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=i) for i in range(32)])
    assert stalls.compiled == [], stalls.text() + "\n" + "\n".join(variant for _, _, variant in stalls.compiled)
