"""What stops the model loop on the host, timed: Triton compiling a kernel, the garbage collector's passes, and
CUDA's allocators growing.

Each stalls the thread that launches the GPU's work, so the GPU idles until it ends. A Triton kernel compiles the
first time it meets a new specialization (a new constexpr, dtype, or an integer argument that turns out to be 1
or a multiple of 16): 0.1-1 s from scratch, milliseconds from Triton's disk cache. The warm-up (engine/warmup.py)
is there so that none compiles once serving has begun; one that still does is a warm-up that missed a shape, and
shows here by name. The collector's passes are kept short by freezing the heap (engine/collector.py); what they
still cost shows here too, by generation. torch's caching allocators grow by asking CUDA for memory: device
segments (cudaMalloc; a retry first frees the cache, synchronizing the device) and pinned host blocks for the
staged copies (engine/staging.py; cudaHostAlloc). After a warm run none of these should happen again.

    with HostStalls() as stalls:
        ...                                  # a run
    stalls.text()       # one line for a log
    stalls.figures()    # {"compiled": [[kernel, seconds, variant], ...], "compile_s", "gc_passes", "gc_s", "cuda"}

Under Triton's interpreter (no GPU) nothing compiles and there is no CUDA: only the collector's passes count.
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch
import triton


class HostStalls:
    """Counts, while entered, every Triton compilation (kernel name, seconds, and Triton's description of the
    variant: its options and each argument's type and specialization), every garbage-collector pass (count and
    seconds by generation) and, once CUDA is in use, how much the CUDA allocators grew. `on_compile(name, seconds,
    variant)`, if given, is called after each compilation (the worker logs it). Triton hooks installed before are
    kept and called first; they are restored on exit."""

    def __init__(self, on_compile: Callable[[str, float, str], None] | None = None):
        self.on_compile = on_compile
        self.compiled: list[tuple[str, float, str]] = []
        self.gc_passes = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.cuda: dict[str, float] | None = None     # the allocators' growth while entered (CUDA only)
        self._compile_started: dict[object, float] = {}
        self._gc_started = 0.0
        self._saved = None
        self._cuda_before: dict[str, float] | None = None

    def __enter__(self) -> "HostStalls":
        runtime = triton.knobs.runtime
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
        self._saved = (before, after)

        def cache_hook(**kwargs):
            # A true result from a cache hook skips the compilation: the earlier hook's answer is passed on as is.
            skip = before(**kwargs) if before is not None else None
            if not skip:
                self._compile_started[kwargs["key"]] = time.perf_counter()
            return skip

        def post_compile_hook(**kwargs):
            if after is not None:
                after(**kwargs)
            started = self._compile_started.pop(kwargs["key"], None)
            seconds = time.perf_counter() - started if started is not None else 0.0
            name = kwargs["fn"].name
            self.compiled.append((name, seconds, kwargs["repr"]))
            if self.on_compile is not None:
                self.on_compile(name, seconds, kwargs["repr"])

        runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_hook, post_compile_hook
        gc.callbacks.append(self._on_gc)
        self._cuda_before = _cuda_counts()
        return self

    def __exit__(self, *exc) -> None:
        after = _cuda_counts()
        if after is not None and self._cuda_before is not None:
            self.cuda = {key: after[key] - self._cuda_before[key] for key in after}
        gc.callbacks.remove(self._on_gc)
        runtime = triton.knobs.runtime
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._saved

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            generation = info["generation"]
            self.gc_passes[generation] += 1
            self.gc_seconds[generation] += time.perf_counter() - self._gc_started

    def figures(self) -> dict:
        return {"compiled": [[name, round(s, 4), variant] for name, s, variant in self.compiled],
                "compile_s": round(sum(s for _, s, _ in self.compiled), 4),
                "gc_passes": list(self.gc_passes), "gc_s": [round(s, 4) for s in self.gc_seconds],
                "cuda": self.cuda}

    def text(self) -> str:
        """One line: the compilations (by kernel, with their seconds), the collector's passes, the allocators."""
        gc_text = ", ".join(f"gen{g} {n} in {s * 1000:.0f} ms" for g, (n, s) in
                            enumerate(zip(self.gc_passes, self.gc_seconds)) if n)
        if self.compiled:
            kernels: dict[str, list[float]] = {}
            for name, seconds, _ in self.compiled:
                kernels.setdefault(name, []).append(seconds)
            compiled = ", ".join(f"{name} x{len(s)} ({sum(s) * 1000:.0f} ms)" for name, s in kernels.items())
            compiled = f"Triton compiled {len(self.compiled)} kernels: {compiled}"
        else:
            compiled = "Triton compiled nothing"
        line = f"host stalls: {compiled}; garbage collector: {gc_text or 'no pass'}"
        if self.cuda is not None:
            c = self.cuda
            line += (f"; CUDA: {c['device_segments']:.0f} device segments allocated ({c['alloc_retries']:.0f} "
                     f"retries), {c['pinned_blocks']:.0f} pinned blocks in {c['pinned_alloc_ms']:.1f} ms")
        return line


def _cuda_counts() -> dict[str, float] | None:
    """The CUDA allocators' running totals, or None where CUDA is not in use (never initialized here)."""
    if not torch.cuda.is_initialized():
        return None
    device, host = torch.cuda.memory_stats(), torch.cuda.host_memory_stats()
    return {"device_segments": device.get("segment.all.allocated", 0),
            "alloc_retries": device.get("num_alloc_retries", 0),
            "pinned_blocks": host.get("num_host_alloc", 0),
            "pinned_alloc_ms": host.get("host_alloc_time.total", 0) / 1000}
