"""The worker or the scheduler dies under load: requests in flight end with a clear error, none hangs; readiness
reports it; once `pagestream serve` has restarted the service, new requests are served."""
from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import start_stack, stop_stack


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


@pytest.mark.parametrize("victim", ["worker", "scheduler"])
def test_killed_service_fails_in_flight_requests_then_recovers(stack, victim):
    async def scenario():
        started = asyncio.Event()
        run = asyncio.create_task(long_streams(stack, 6, started))
        await asyncio.wait_for(started.wait(), 60)
        assert stack.kill(victim)
        killed_at = time.monotonic()
        outcomes = await asyncio.wait_for(run, 30)          # none hangs
        return outcomes, time.monotonic() - killed_at

    outcomes, seconds = asyncio.run(scenario())
    assert all(o.startswith("error") and victim in o for o in outcomes), outcomes
    assert seconds < 10
    deadline = time.monotonic() + 120
    while not ready(stack):                                  # serve restarts it; readiness follows
        assert time.monotonic() < deadline, f"not ready again:\n{stack.log()[-3000:]}"
        time.sleep(0.5)
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text


def test_readiness_is_false_while_the_worker_is_gone(stack):
    assert ready(stack)
    stack.kill("worker")
    deadline = time.monotonic() + 10
    while ready(stack):
        assert time.monotonic() < deadline, "still ready without a worker"
        time.sleep(0.2)
    deadline = time.monotonic() + 120
    while not ready(stack):
        assert time.monotonic() < deadline
        time.sleep(0.5)
