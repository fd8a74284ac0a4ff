"""Beam search through the streaming engine (AsyncLLM.beam_search) on the default model: the same beams as
LLM.beam_search for the same prompts (itself checked against a plain reference in test_beam_search.py), while
greedy requests stream beside them; an invalid prompt fails the call and leaves nothing running; a caller that
leaves aborts its searches and their blocks are freed."""
from __future__ import annotations

import asyncio

import pytest

from engine import LLM, AsyncLLM, BeamSearchParams, SamplingParams

PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def engines():
    engine = AsyncLLM(progress=False, max_model_len=512)
    yield engine, LLM(progress=False, max_model_len=512)
    engine.shutdown()


def assert_same_output(got, want):
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
    assert [s.text for s in got.sequences] == [s.text for s in want.sequences]
    assert [(s.finish_reason, s.stop_reason) for s in got.sequences] == \
        [(s.finish_reason, s.stop_reason) for s in want.sequences]
    # Batched differently, so equal up to float rounding.
    assert [s.cum_logprob for s in got.sequences] == pytest.approx([s.cum_logprob for s in want.sequences],
                                                                   abs=1e-4)


@pytest.mark.parametrize("params", [BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS),
                                    BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True,
                                                     length_penalty=0.5)])
def test_equals_offline_beam_search(engines, params):
    engine, llm = engines
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main():
        async def stream_greedy():
            return [out async for out in engine.generate(PROMPTS[1], greedy)]

        # A greedy request streams beside the searches, as a server's other clients would.
        return await asyncio.gather(engine.beam_search(PROMPTS, params), engine.beam_search(PROMPTS[0], params),
                                    stream_greedy())

    both, single, streamed = asyncio.run(main())
    want = llm.beam_search(PROMPTS, params)
    assert len(both) == len(PROMPTS) and len(single) == 1
    for got, expected in zip(both + single, want + want[:1]):
        assert len(got.sequences) == params.beam_width
        assert_same_output(got, expected)
    assert streamed[-1].outputs[0].token_ids == llm.generate(PROMPTS[1], greedy)[0].outputs[0].token_ids
    assert len(streamed) > 1                                      # it streamed, not waiting for the searches
    assert engine.engine.stats().kv.num_used_blocks == 0


def test_kv_blocks_saved_is_reported(engines):
    engine, llm = engines
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)
    [got] = asyncio.run(engine.beam_search(PROMPTS[1], params))
    [want] = llm.beam_search(PROMPTS[1], params)
    assert got.kv_blocks_saved == want.kv_blocks_saved > 0


def test_invalid_prompt_fails_and_nothing_keeps_running(engines):
    engine, llm = engines
    params = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS)

    async def main():
        with pytest.raises(ValueError, match="maximum context length"):
            await engine.beam_search([PROMPTS[0], [5] * 600], params)
        return await engine.beam_search(PROMPTS[0], params)

    [after] = asyncio.run(main())
    assert_same_output(after, llm.beam_search(PROMPTS[0], params)[0])
    assert not engine.engine.has_unfinished_requests()


def test_leaving_aborts_the_searches(engines):
    engine, _ = engines
    params = BeamSearchParams(beam_width=3, max_tokens=200, ignore_eos=True)

    async def main():
        task = asyncio.ensure_future(engine.beam_search(PROMPTS, params))
        for _ in range(500):                                          # until the searches hold blocks
            if engine.engine.stats().kv.num_used_blocks:
                break
            await asyncio.sleep(0.01)
        task.cancel()                                                 # the caller went away
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.engine.stats().kv.num_used_blocks == 0 and not engine.engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the cancelled searches kept their blocks")

    asyncio.run(main())
