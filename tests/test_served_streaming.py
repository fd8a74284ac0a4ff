"""Streaming through the served pipeline with multi-step plans (k decode steps per plan), on the default model on
the CPU, where a decode step takes tens of milliseconds: a prompt that arrives during a plan joins at the next step
boundary, every token goes out in a chunk of its own, greedy text is the offline engine's even with chunked
prefill and preemption, and the per-hop metrics add up to the time to first token."""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx
import openai
import pytest

from conftest import start_stack, stop_stack
from engine import LLM, SamplingParams
from schemas.messages import DELIVERY_HOPS, FIRST_TOKEN_HOPS

MODEL = "smollm2-135m-instruct"
K = 8                                   # --num-scheduler-steps, the default


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The default model served with plans of K decode steps."""
    s = start_stack(tmp_path_factory.mktemp("k8"), "--num-scheduler-steps", str(K))
    yield s
    stop_stack(s)


def stream(stack, body: dict, on_chunk=None) -> list[tuple[float, dict]]:
    """POST a streamed completion; every SSE chunk with the time it arrived (on_chunk(time, chunk) sees each as it
    comes). The raw stream, so that nothing merges or splits chunks on the client's side."""
    chunks = []
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json={"model": MODEL, "stream": True, **body},
                      headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                now, chunk = time.monotonic(), json.loads(line[len("data: "):])
                chunks.append((now, chunk))
                if on_chunk is not None:
                    on_chunk(now, chunk)
    return chunks


def num_tokens(chunk: dict) -> int:
    """Tokens a chunk carries, from its logprobs (requested with logprobs=1: a token with no text shows too)."""
    return sum(len(c["logprobs"]["tokens"]) for c in chunk["choices"] if c["logprobs"])


# ---- 1. a prompt joins at the next step boundary, not after the plan ----------------------------------------------
def test_request_arriving_mid_plan_gets_its_first_token_before_that_plan_ends(stack):
    """A's plans are its prompt step (token 1), then K decode steps each: tokens 2-9, 10-17, 18-25... While one
    runs, the scheduler has the next one queued in the worker's stream already. B is sent as soon as A's 2nd token
    reaches the client (m tokens received then: 2, unless this thread was late), so B reaches the scheduler while
    the plan ending at A's token `end` runs (or an earlier one), `end` = the last token of the plan that computes
    token m + slack.

    With step-boundary admission, B goes out at once in a third plan, the worker ends the running plan at the next
    step, skips the queued plan of decode steps, then runs B's prompt: B's first token comes about two steps after
    B reaches the worker, well before A's token `end`. Without it, B waits for the running plan to end and for the
    queued one: its first token comes after A's token end + K (a worker that does not cut plans) or end + 1 (a
    scheduler that keeps two plans outstanding: B's plan is made when the running plan's event comes back, and
    cuts the queued one after its first step). Either way after A's token `end`.

    Counting A's tokens, not seconds, keeps this robust on a loaded machine: a slow step slows A and B alike.
    `slack` steps (a few hundred ms here) cover B's way through gateway, tokenizer and scheduler; the rest of the
    plan covers the worker's cut and B's prompt step (B's first token came after A's 6th here, the bound is 9)."""
    slack = 4
    a_times: list[float] = []
    second = threading.Event()

    def on_a(now: float, chunk: dict) -> None:
        for _ in range(num_tokens(chunk)):
            a_times.append(now)
        if len(a_times) >= 2:
            second.set()

    a_body = {"prompt": "The history of the Roman Empire", "max_tokens": 40, "temperature": 0, "logprobs": 1,
              "ignore_eos": True}
    a = threading.Thread(target=stream, args=(stack, a_body, on_a))
    a.start()
    try:
        assert second.wait(timeout=120), "A's second token never came"
        m = len(a_times)
        b = stream(stack, {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "logprobs": 1})
    finally:
        a.join(timeout=300)
    assert len(a_times) == 40 and sum(num_tokens(c) for _, c in b) == 4

    def plan_end(token: int) -> int:               # the last token of the plan that computes A's token-th token
        return 1 + K * -(-(token - 1) // K)

    end = plan_end(m + slack)
    b_first = next(t for t, c in b if num_tokens(c))
    a_before_b = sum(t < b_first for t in a_times)
    assert a_before_b < end, (f"B, sent after A's token {m}, got its first token after A's token {a_before_b}: "
                              f"it waited for the plan ending at token {end} (and more)")


# ---- 2. one token per chunk, as it is produced ----------------------------------------------------------------------
def test_every_streamed_chunk_carries_one_token_as_it_is_produced(stack):
    """A plan of K steps publishes each step's tokens as they come: the client gets one chunk per token, not K
    tokens in one chunk, and not K chunks at once. Counted twice: chunks with text (this prompt's 32 greedy
    tokens all have text) against usage.completion_tokens, and each chunk's logprobs (logprobs=1), which list
    every token even one with no text of its own. Spread in time: bursts of K would make the median gap between
    chunks near zero (K - 1 of every K gaps), while one chunk per step keeps it near the mean gap."""
    body = {"prompt": "Count from one to twenty in words: one, two, three,", "max_tokens": 32, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    *plain, usage = [c for _, c in stream(stack, body)]
    texts = [c["choices"][0]["text"] for c in plain]
    assert usage["usage"]["completion_tokens"] == 32
    assert len(texts) == 32 and all(texts)

    timed = stream(stack, {**body, "logprobs": 1})
    chunks = [(t, c) for t, c in timed if c["choices"]]
    assert timed[-1][1]["usage"]["completion_tokens"] == 32
    assert [num_tokens(c) for _, c in chunks] == [1] * 32
    assert "".join(c["choices"][0]["text"] for _, c in chunks) == "".join(texts)

    times = [t for t, _ in chunks[1:]]             # from the first decode token on: the prompt step is slower
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.median(gaps) > statistics.mean(gaps) / 4, f"tokens came in bursts: gaps {gaps}"


# ---- 3. served greedy text is the offline engine's, through chunked prefill and preemption -------------------------
TIGHT = dict(max_num_batched_tokens=32, num_blocks=24, block_size=16)   # chunked prompts, preemption
# Prompts of about 60 tokens (more than a step's budget of 32) and 48 tokens each: 7 KV blocks a request, so 8 of
# them at once outgrow the 24 blocks.
TOPICS = ["the ocean tides", "volcanoes", "the printing press", "honey bees", "the first airplanes", "glaciers",
          "the Silk Road", "black holes"]
LONG_PROMPTS = [f"Here is a short essay about {topic}, written for curious students who want to understand how "
                f"it works, why it matters, and what people have learned about it over the centuries. The essay "
                f"begins with a simple question:" for topic in TOPICS]
OUTPUT_TOKENS = 48


@pytest.fixture(scope="module", params=[1, K], ids=lambda k: f"k{k}")
def tight(request, tmp_path_factory):
    """(k, a stack and the offline engine) with the same tight flags and k decode steps per plan."""
    k = request.param
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TIGHT.items()]
    s = start_stack(tmp_path_factory.mktemp(f"tight-k{k}"), "--num-scheduler-steps", str(k), *flags)
    try:
        yield k, s, LLM(progress=False, max_model_len=2048, num_scheduler_steps=k, **TIGHT)
    finally:
        stop_stack(s)


def test_served_greedy_equals_offline_with_chunked_prefill_and_preemption(tight):
    """The requests are sent at once, so they share steps, their prompts are cut into chunks, and sequences are
    preempted and recomputed; each must still get exactly the offline engine's greedy tokens (its text, and all
    OUTPUT_TOKENS of them: a token the model computed but the client never got shows as a short count)."""
    k, stack, offline = tight
    assert all(len(offline.tokenizer.encode(p)) > TIGHT["max_num_batched_tokens"] for p in LONG_PROMPTS)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(LONG_PROMPTS, params)]

    async def served() -> list:
        client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0,
                                    timeout=600)
        try:
            return await asyncio.gather(*(client.completions.create(
                model=MODEL, prompt=p, max_tokens=OUTPUT_TOKENS, temperature=0, extra_body={"ignore_eos": True})
                for p in LONG_PROMPTS))
        finally:
            await client.close()

    responses = asyncio.run(served())
    assert [r.usage.completion_tokens for r in responses] == [OUTPUT_TOKENS] * len(LONG_PROMPTS)
    assert [r.choices[0].text for r in responses] == expected

    # The scheduler publishes its stats every half second.
    deadline = time.monotonic() + 10
    while not (stack.metric("pagestream_num_preemptions_total") or 0) > 0:
        assert time.monotonic() < deadline, f"no preemption with k={k}: the test did not test it"
        time.sleep(0.2)


# ---- 4. the per-hop metrics add up to the time to first token --------------------------------------------------------
def histogram(metrics: dict, name: str) -> dict[str, tuple[float, float]]:
    """hop -> (sum, count) of a histogram labelled by hop, in a scrape (ServeStack.metrics)."""
    def by_hop(sample: str) -> dict[str, float]:
        return {dict(labels)["hop"]: value for (n, labels), value in metrics.items() if n == f"{name}_{sample}"}

    sums, counts = by_hop("sum"), by_hop("count")
    assert set(sums) == set(counts) == set(by_hop("bucket")), name         # a histogram, each hop whole
    return {hop: (sums[hop], counts[hop]) for hop in counts}


def test_hop_metrics_add_up_to_the_time_to_first_token(stack):
    """One streamed request, sent alone: between a scrape before it and one after, each first-token hop counted
    once and every delivery hop once per token; the first-token hops' sums add up to the gateway's own time to
    first token (within 1% or 5 ms: the gateway starts its clock as it reads the body and stops it as it writes,
    the hops run from the request's parsing to the write's end) and to the one this client measured, from
    sending the request to the first chunk with text (within 10%: the client's side of the connection)."""
    first_name, delivery_name = "pagestream_first_token_hop_seconds", "pagestream_token_hop_seconds"
    body = {"model": MODEL, "prompt": " ".join(LONG_PROMPTS[:3]), "max_tokens": 8, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.api_key}"},
                      timeout=120) as client:
        assert client.get("/health").status_code == 200           # the connection is open before the clock starts
        before = stack.metrics()
        sent, first, usage = time.monotonic(), None, None
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.monotonic()
                usage = chunk.get("usage") or usage
        client_ttft = first - sent
    after = stack.metrics()

    first_before, first_after = histogram(before, first_name), histogram(after, first_name)
    delivery_before, delivery_after = histogram(before, delivery_name), histogram(after, delivery_name)
    assert set(first_after) == set(FIRST_TOKEN_HOPS) and set(delivery_after) == set(DELIVERY_HOPS)
    for hop in FIRST_TOKEN_HOPS:
        assert first_after[hop][1] - first_before.get(hop, (0, 0))[1] == 1, hop
    for hop in DELIVERY_HOPS:
        assert delivery_after[hop][1] - delivery_before.get(hop, (0, 0))[1] == usage["completion_tokens"], hop

    hops = sum(first_after[hop][0] - first_before.get(hop, (0, 0))[0] for hop in FIRST_TOKEN_HOPS)
    ttft = "pagestream_time_to_first_token_seconds_sum"
    gateway_ttft = after[ttft, ()] - before.get((ttft, ()), 0.0)
    assert hops == pytest.approx(gateway_ttft, rel=0.01, abs=0.005)
    assert hops == pytest.approx(client_ttft, rel=0.10)
