"""pagestream's engine core: paged KV cache, continuous batching, Llama-family models, usable in-process.

    from engine import LLM, SamplingParams
    LLM("smollm2-135m-instruct").generate(["The capital of France is"], SamplingParams(max_tokens=16))

Names are imported lazily, so a process that only needs the scheduler does not load torch or transformers.
"""
import importlib

_EXPORTS = {
    "LLM": "engine.llm", "AsyncLLM": "engine.async_llm", "LLMEngine": "engine.llm_engine",
    "SamplingParams": "schemas.sampling_params", "StructuredOutputsParams": "schemas.structured_outputs",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs", "EngineConfig": "engine.config", "ModelConfig": "engine.config",
    "CacheConfig": "engine.config", "SchedulerConfig": "engine.config",
    "BeamSearchParams": "schemas.beam_search_params", "BeamSearchOutput": "engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
