"""The serving benchmark's datasets (token counts by the model's tokenizer) and its arithmetic (percentiles,
TPOT, goodput)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest import datasets
from loadtest.datasets import count_tokens
from loadtest.client import RequestOutput
from loadtest.metrics import meets_slo, parse_slo, percentile, summarize, tpot


# ---- datasets --------------------------------------------------------------------------------------------------
def test_random_prompts_have_the_drawn_lengths(default_tokenizer):
    exact = datasets.random_requests(default_tokenizer, 30, input_len=48, output_len=16, seed=1)
    assert all(r.prompt_len == 48 == count_tokens(default_tokenizer, r.prompt) and r.output_len == 16 for r in exact)
    assert len({r.prompt for r in exact}) == 30                           # no two alike: no shared prefix cache
    assert datasets.random_requests(default_tokenizer, 30, 48, 16, seed=1) == exact
    assert datasets.random_requests(default_tokenizer, 30, 48, 16, seed=2) != exact
    ranged = datasets.random_requests(default_tokenizer, 200, input_len=40, output_len=20, range_ratio=0.5, seed=3)
    assert all(20 <= r.prompt_len <= 60 and 10 <= r.output_len <= 30 for r in ranged)
    assert all(r.prompt_len == count_tokens(default_tokenizer, r.prompt) for r in ranged)
    assert len({r.output_len for r in ranged}) > 10                        # spread, not a constant
    with pytest.raises(ValueError, match="range-ratio"):
        datasets.random_requests(default_tokenizer, 1, 10, 10, range_ratio=1.0)


def test_workload_draws_as_the_offline_bench_does(default_tokenizer):
    from loadtest.throughput import draw_requests, load_workload
    requests = datasets.workload_requests(default_tokenizer, "w256", 12, scale=0.25)
    offline = draw_requests(load_workload("w256"), len(default_tokenizer), 12, 0.25)
    assert [r.output_len for r in requests] == [ol for _, ol in offline]
    assert [r.prompt_len for r in requests] == [len(ids) for ids, _ in offline]
    assert all(r.prompt_len == count_tokens(default_tokenizer, r.prompt) for r in requests)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_sharing_prompts_share_exactly_their_prefix(default_tokenizer):
    # Many short requests: a prompt whose prefix's last token merges with its question's first (about 3 in 100
    # of these without the newline between them) is then all but sure to be among them.
    tokenizer, prefix_len = default_tokenizer, 32
    requests = datasets.prefix_sharing_requests(tokenizer, num_prefixes=8, prefix_len=prefix_len, num=202,
                                                suffix_len=8, output_len=8, seed=1)
    assert len(requests) == 202
    assert all(r.prompt_len == count_tokens(tokenizer, r.prompt) and r.output_len == 8 for r in requests)
    # The tokens the server (and so its prefix cache) sees: encoded as a completion's prompt is, specials and all.
    ids = [tokenizer.encode(r.prompt) for r in requests]
    shared = [[common_prefix_len(a, b) for b in ids] for a in ids]
    # Sharing the prefix's tokens splits the requests into the prefixes' groups, as even as 202 / 8 allows ...
    groups: list[list[int]] = []
    for i in range(len(ids)):
        group = next((g for g in groups if shared[i][g[0]] >= prefix_len), None)
        group.append(i) if group else groups.append([i])
    assert sorted(len(g) for g in groups) == [25] * 6 + [26] * 2
    for group in groups:
        for i in group:
            for j in range(len(ids)):
                if j == i:
                    continue
                if j in group:      # the prefix whole, then the newline and the questions part at once
                    assert prefix_len <= shared[i][j] <= prefix_len + 2, (i, j, shared[i][j])
                else:               # different prefixes share nothing to speak of
                    assert shared[i][j] < 4, (i, j, shared[i][j])
        assert all(len(ids[i]) >= prefix_len + 8 for i in group)
    # ... in a shuffled order, the seed's.
    order = [next(k for k, g in enumerate(groups) if i in g) for i in range(len(ids))]
    assert order != [i % 8 for i in range(len(ids))]
    assert datasets.prefix_sharing_requests(tokenizer, 8, prefix_len, 202, 8, 8, seed=1) == requests
    assert datasets.prefix_sharing_requests(tokenizer, 8, prefix_len, 202, 8, 8, seed=2) != requests
    with pytest.raises(ValueError, match="positive"):
        datasets.prefix_sharing_requests(tokenizer, num_prefixes=0)


def test_sharegpt(default_tokenizer, tmp_path):
    long_reply = "The capital of France is Paris, a city on the Seine."
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France, please?"},
                                      {"from": "gpt", "value": long_reply}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "I start, so there is no question here"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "d", "conversations": [{"from": "system", "value": "be brief"},
                                      {"from": "human", "value": "Name three colors of the rainbow."},
                                      {"from": "gpt", "value": "Red, orange and yellow are three of them."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    got = datasets.sharegpt_requests(path, default_tokenizer, num=10, seed=0)
    assert sorted((r.prompt, r.output_len) for r in got) == sorted([
        ("What is the capital of France, please?", count_tokens(default_tokenizer, long_reply)),
        ("Name three colors of the rainbow.",
         count_tokens(default_tokenizer, "Red, orange and yellow are three of them."))])
    assert all(r.prompt_len == count_tokens(default_tokenizer, r.prompt) for r in got)
    fixed = datasets.sharegpt_requests(path, default_tokenizer, num=10, output_len=7)
    assert len(fixed) == 3 and {r.output_len for r in fixed} == {7}      # "Hi" kept: its reply is not used
    assert len(datasets.sharegpt_requests(path, default_tokenizer, num=1)) == 1
    path.write_text(json.dumps([data[1]]))
    with pytest.raises(ValueError, match="no usable conversation"):
        datasets.sharegpt_requests(path, default_tokenizer, num=10)


def test_jsonl(default_tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Tell me a story.", "output_len": 40}\n\n{"prompt": "Hi", "max_tokens": 8}\n'
                    '{"prompt": "No length"}\n')
    got = datasets.jsonl_requests(path, default_tokenizer, num=10, output_len=5)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in got] == [
        ("Tell me a story.", count_tokens(default_tokenizer, "Tell me a story."), 40),
        ("Hi", count_tokens(default_tokenizer, "Hi"), 8),
        ("No length", count_tokens(default_tokenizer, "No length"), 5)]
    assert len(datasets.jsonl_requests(path, default_tokenizer, num=2, output_len=5)) == 2
    with pytest.raises(ValueError, match=":4: no output_len"):
        datasets.jsonl_requests(path, default_tokenizer, num=10)
    path.write_text('["not", "an object"]\n')
    with pytest.raises(ValueError, match=":1: expected a JSON object"):
        datasets.jsonl_requests(path, default_tokenizer, num=10, output_len=5)
    assert [r.prompt for r in datasets.cycle_to(got, 7)] == [r.prompt for r in got] * 2 + [got[0].prompt]


# ---- metrics ---------------------------------------------------------------------------------------------------
def output(ttft: float, e2el: float, tokens: int, itl=(), success=True, error="") -> RequestOutput:
    out = RequestOutput(prompt_len=10, output_len=tokens, success=success, error=error, ttft=ttft, e2el=e2el,
                        itl=list(itl), chunks=len(itl) + 1, usage_completion_tokens=tokens, output_tokens=tokens,
                        tokens_from="usage")
    return out


def test_percentiles_are_numpys():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        values = rng.exponential(size=n).tolist()
        for p in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(values, p) == pytest.approx(np.percentile(values, p))


def test_summary_and_goodput():
    outputs = [output(0.100, 1.100, 11, itl=[0.1] * 10),        # TPOT 100 ms
               output(0.300, 0.800, 6, itl=[0.1] * 5),           # TPOT 100 ms, TTFT over a 200 ms bound
               output(0.050, 0.050, 1),                          # one token: no TPOT
               output(0.010, 2.010, 5, itl=[0.5] * 4),           # TPOT 500 ms
               output(None, 0.02, 0, success=False, error="HTTP 429: slow down")]
    assert [tpot(o) for o in outputs] == [pytest.approx(0.1), pytest.approx(0.1), None, pytest.approx(0.5), None]
    s = summarize(outputs, duration_s=4.0, slo=parse_slo(["ttft:200", "tpot:150"]))
    assert (s["completed"], s["failed"], s["errors"]) == (4, 1, {"HTTP 429: slow down": 1})
    assert s["total_output_tokens"] == 23 and s["total_input_tokens"] == 40
    assert s["output_throughput"] == 23 / 4 and s["request_throughput"] == 1.0
    assert s["total_token_throughput"] == 63 / 4
    assert s["mean_ttft_ms"] == pytest.approx(115) and s["median_ttft_ms"] == pytest.approx(75)
    assert s["mean_tpot_ms"] == pytest.approx(700 / 3) and s["median_tpot_ms"] == pytest.approx(100)
    assert s["mean_itl_ms"] == pytest.approx((15 * 100 + 4 * 500) / 19)
    assert s["p99_e2el_ms"] == pytest.approx(np.percentile([1100, 800, 50, 2010], 99))
    assert s["mean_concurrency"] == pytest.approx((1.1 + 0.8 + 0.05 + 2.01) / 4)
    assert s["good_requests"] == 2 and s["goodput"] == 0.5                # the first, and the one-token request
    assert [meets_slo(o, {"e2el": 1000}) for o in outputs] == [False, True, True, False, False]


def test_slo_parsing():
    assert parse_slo(["ttft:500", "tpot:50", "e2el:1e4"]) == {"ttft": 500, "tpot": 50, "e2el": 10000}
    assert parse_slo(None) == {}
    for bad in ("ttft", "itl:5", "ttft:fast", "tpot:-1"):
        with pytest.raises(ValueError):
            parse_slo([bad])
