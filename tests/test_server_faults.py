"""The worker or the scheduler dies under load. The scheduler: requests in flight end with a clear error, none
hangs. The worker: no request is lost; each waits for the worker that serve starts again and goes on there with
exactly its undisturbed text. Readiness reports either; once serve has restarted the service, new requests are
served."""
from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import start_stack, stop_stack
from schemas.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("faults"), api_key=None)
    yield s
    stop_stack(s)


def ready(stack) -> bool:
    try:
        with urllib.request.urlopen(f"{stack.base_url}/health/ready", timeout=15) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


async def long_streams(stack, n: int, started: asyncio.Event) -> list[str]:
    """n streaming requests that would take minutes; each ends as 'done', or 'error: ...' if it failed."""
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=120)

    async def one(i: int) -> str:
        try:
            stream = await client.completions.create(model="smollm2-135m-instruct", prompt=f"Story {i}:",
                                                     max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                started.set()
            return "done"
        except (openai.APIError, ValueError) as e:
            return f"error: {e}"

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def test_killed_scheduler_fails_in_flight_requests_then_recovers(stack):
    async def scenario():
        started = asyncio.Event()
        run = asyncio.create_task(long_streams(stack, 6, started))
        await asyncio.wait_for(started.wait(), 60)
        assert stack.kill("scheduler")
        killed_at = time.monotonic()
        outcomes = await asyncio.wait_for(run, 30)          # none hangs
        return outcomes, time.monotonic() - killed_at

    outcomes, seconds = asyncio.run(scenario())
    assert all(o.startswith("error") and "scheduler" in o for o in outcomes), outcomes
    assert seconds < 10
    wait_ready_again(stack)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text


def test_killed_worker_loses_no_request(stack, offline):
    """The only worker dies mid-stream: its requests wait in the scheduler for the worker serve starts again, are
    prefilled there from their prompts and the tokens already made, and end with exactly the offline text."""
    prompts = [f"Story {i}:" for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params)]

    async def scenario() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=300)
        started = asyncio.Event()

        async def one(prompt: str) -> str:
            stream = await client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=40,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            text = ""
            async for chunk in stream:
                text += chunk.choices[0].text
                started.set()
            return text

        run = asyncio.gather(*(one(p) for p in prompts))
        await asyncio.wait_for(started.wait(), 60)
        assert stack.kill("worker")
        try:
            return await asyncio.wait_for(run, 240)
        finally:
            await client.close()

    assert asyncio.run(scenario()) == expected
    wait_ready_again(stack)


def wait_ready_again(stack) -> None:
    deadline = time.monotonic() + 120
    while not ready(stack):                                  # serve restarts it; readiness follows
        assert time.monotonic() < deadline, f"not ready again:\n{stack.log()[-3000:]}"
        time.sleep(0.5)


def test_readiness_is_false_while_no_worker_beats(stack):
    """A worker that stalls (stopped here with SIGSTOP) past its heartbeat's deadline: readiness goes false; the
    scheduler gives it up, and when it runs again it stops itself and serve starts it afresh."""
    assert ready(stack)
    [pid] = stack.service_pids("worker")
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while ready(stack):
            assert time.monotonic() < deadline, "still ready without a worker"
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_ready_again(stack)
    assert stack.service_pids("worker") != [pid], "the stalled worker must have started afresh"
