"""The streaming engine: outputs stream per step and add up to the offline result; a consumer that leaves
aborts its request and its KV blocks are freed; bad requests fail at once and the engine keeps serving."""
from __future__ import annotations

import asyncio

import pytest

from conftest import random_prompts
from engine import LLM, AsyncLLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    engine = AsyncLLM(path, progress=False)
    yield engine, LLM(path, progress=False)
    engine.shutdown()


async def collect(engine: AsyncLLM, prompt, params=GREEDY):
    deltas, last = [], None
    async for out in engine.generate(prompt, params):
        deltas.append(out.outputs[0].delta_token_ids)
        last = out
    return deltas, last


def test_concurrent_streams_equal_offline(engines):
    engine, llm = engines
    prompts = random_prompts(6, 4, 60, seed=11)

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    results = asyncio.run(main())
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    for (deltas, last), ref in zip(results, expected):
        assert sum(deltas, []) == last.outputs[0].token_ids == ref
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert len(deltas) == 24                                      # one token per step, streamed as it came


def test_leaving_the_stream_aborts_and_frees_blocks(engines):
    engine, _ = engines
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main():
        seen = 0
        async for _ in engine.generate(random_prompts(1, 100, 100, seed=12)[0], params):
            seen += 1
            if seen == 3:
                break                                                 # the client went away
        for _ in range(100):                                          # the engine thread frees within a step
            if engine.engine.stats().kv.num_used_blocks == 0:
                return seen
            await asyncio.sleep(0.02)
        raise AssertionError("blocks were not freed")

    assert asyncio.run(main()) == 3
    assert not engine.engine.has_unfinished_requests()


def test_invalid_request_fails_fast_and_engine_keeps_serving(engines):
    engine, llm = engines
    prompt = random_prompts(1, 10, 10, seed=13)[0]

    async def main():
        with pytest.raises(ValueError, match="token ids must be integers"):
            await collect(engine, [1, 2, 10**6])
        with pytest.raises(ValueError, match="maximum context length is 1024 tokens"):
            await collect(engine, [5] * 5000)
        return await collect(engine, prompt)

    _, last = asyncio.run(main())
    assert last.outputs[0].token_ids == llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
