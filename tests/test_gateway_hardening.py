"""The gateway, safe to run by strangers: against a real `pagestream serve` (its own redis-server, the default
model), over real HTTP and raw sockets. Readiness probes are shared by every caller; /metrics takes a key."""
from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_stack, stop_stack
from services.pipeline_client import READY_TTL_S

API_KEY = "test-key"
METRICS_KEY = "scrape-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("hardened"), api_key=API_KEY)
    yield s
    stop_stack(s)


def metric(stack, name: str, key: str = API_KEY) -> float:
    """One unlabelled sample of /metrics, as Prometheus would parse it."""
    r = httpx.get(f"{stack.base_url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    samples = {s.name: s.value for family in text_string_to_metric_families(r.text) for s in family.samples
               if not s.labels}
    return samples[name]


# ---- /health/ready: one probe a second, however many ask -----------------------------------------------------
def test_200_concurrent_readiness_calls_share_one_probe(stack):
    time.sleep(READY_TTL_S)                           # whatever answer is cached has expired
    before = metric(stack, "pagestream_gateway_readiness_checks_total")

    async def all_at_once() -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=60) as http:
            start = time.monotonic()
            responses = await asyncio.gather(*(http.get("/health/ready") for _ in range(200)))
            return responses, time.monotonic() - start

    responses, took = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 200
    assert {r.json()["status"] for r in responses} == {"ready"}
    probes = metric(stack, "pagestream_gateway_readiness_checks_total") - before
    # at least one probe (the cache had expired), and then at most one more per second the calls took
    assert 1 <= probes <= 1 + math.ceil(took / READY_TTL_S), (probes, took)
