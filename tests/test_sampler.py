"""Sampler tests: each property is checked against a plain-Python reference written here."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import Sampler, SamplingBatch, SamplingRow, apply_min_tokens, apply_penalties, mix64, uniform
from loadtest.processes import argv, descendants
from schemas.sampling_params import SamplingParams

EOS = 2
M64 = (1 << 64) - 1
sampler = Sampler()


def row(seed: int = 0, prompt=(), output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, list(prompt) + list(output), len(prompt))


def batch_of(rows: list[SamplingRow], vocab_size: int) -> SamplingBatch:
    return SamplingBatch.from_rows(rows, vocab_size, {EOS}, "cpu")


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return sampler(logits, batch_of(rows, logits.shape[1]))


# ---- references -------------------------------------------------------------------------------------------------

def py_mix64(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_penalized(logits: list[float], r: SamplingRow) -> list[float]:
    p, out = r.params, list(logits)
    for t in set(r.prompt_token_ids) | set(r.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(r.output_token_ids):
        out[t] -= p.frequency_penalty * list(r.output_token_ids).count(t) + p.presence_penalty
    return out


def ref_filtered_probs(logits: list[float], p: SamplingParams, tol: float = 0.0) -> dict[int, float]:
    """softmax(logits / T) over the tokens that top-k, then top-p (renormalized over the top k), then min-p
    keep, renormalized. tol widens every boundary, to allow for float32 rounding in the sampler."""
    scaled = [x / p.temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = math.fsum(weights)
    probs = [w / total for w in weights]
    order = sorted(range(len(probs)), key=lambda v: -probs[v])[:p.top_k or len(probs)]
    mass_k = sum(probs[v] for v in order)
    kept, above = {}, 0.0
    for v in order:
        if above / mass_k < p.top_p + tol and probs[v] >= p.min_p * probs[order[0]] * (1 - tol):
            kept[v] = probs[v]
        above += probs[v]
    total = sum(kept.values())
    return {v: q / total for v, q in kept.items()}


# ---- the random numbers -----------------------------------------------------------------------------------------

def test_mix64_matches_splitmix64():
    assert py_mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF   # splitmix64(seed=0)'s first output
    rng = random.Random(0)
    values = [0, 1, 1 << 63, M64, 0x9E3779B97F4A7C15] + [rng.getrandbits(64) for _ in range(1000)]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
    assert [v & M64 for v in mix64(signed).tolist()] == [py_mix64(v) for v in values]


def test_uniform_is_open_unit_interval_and_per_row():
    seeds = torch.tensor([0, 1, -1, 2**62, -(2**63)], dtype=torch.int64)
    steps = torch.tensor([0, 5, 0, 1, 123], dtype=torch.int64)
    u = uniform(seeds, steps, 50_000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert torch.equal(uniform(seeds[perm], steps[perm], 50_000), u[perm])


# ---- greedy and penalties ---------------------------------------------------------------------------------------

penalized_rows = st.builds(
    lambda seed, prompt, output, rep, pres, freq, temp: row(
        seed, prompt, output, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
        temperature=temp),
    st.integers(0, 2**64), st.lists(st.integers(0, 19), max_size=12), st.lists(st.integers(0, 19), max_size=12),
    st.sampled_from([1.0, 0.5, 1.3, 2.0]), st.floats(-2, 2), st.floats(-2, 2), st.sampled_from([0.0, 0.0, 0.8]))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(penalized_rows, min_size=1, max_size=6), logits_seed=st.integers(0, 2**32 - 1))
def test_penalties_and_greedy_match_reference(rows, logits_seed):
    logits = torch.randn(len(rows), 20, generator=torch.Generator().manual_seed(logits_seed)) * 3
    batch = batch_of(rows, 20)
    reference = [ref_penalized(lr, r) for lr, r in zip(logits.tolist(), rows)]
    if batch.penalties is not None:
        penalized = apply_penalties(logits, batch.penalties)
        assert torch.allclose(penalized, torch.tensor(reference), atol=1e-5)
    else:
        assert reference == logits.tolist()
    token_ids = sampler(logits, batch).token_ids.tolist()
    for t, ref, r in zip(token_ids, reference, rows):
        if r.params.greedy:
            assert ref[t] >= max(ref) - 1e-5


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(16, 300)
    for seed in (1, 2):
        out = sample(logits, [row(seed + b, temperature=0.0) for b in range(16)])
        assert torch.equal(out.token_ids, logits.argmax(-1))


# ---- min_tokens -------------------------------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    # vLLM's choice, kept here: min_tokens holds back the row's stop tokens, i.e. stop_token_ids plus EOS unless
    # ignore_eos (with ignore_eos EOS ends nothing, so it stays sampleable).
    logits = torch.zeros(5, 10)
    logits[:, EOS], logits[:, 5], logits[:, 7] = 9.0, 8.0, 7.0       # EOS, then the stop id, are the favourites
    rows = [row(min_tokens=3, output=[1], stop_token_ids=[5, 99], temperature=0.0),   # 99 >= vocab: ignored
            row(min_tokens=3, output=[1], stop_token_ids=[5], ignore_eos=True, temperature=0.0),
            row(min_tokens=3, output=[1, 1, 1], stop_token_ids=[5], temperature=0.0),  # reached: nothing masked
            row(stop_token_ids=[5], temperature=0.0),
            row(min_tokens=1, temperature=0.0)]
    batch = batch_of(rows, 10)
    masked = apply_min_tokens(logits, batch.held, batch.steps) == float("-inf")
    assert [set(torch.nonzero(m).flatten().tolist()) for m in masked] == [{EOS, 5}, {5}, set(), set(), {EOS}]
    assert sampler(logits, batch).token_ids.tolist() == [7, EOS, EOS, EOS, 5]
    random_rows = [row(seed, min_tokens=2, stop_token_ids=[5]) for seed in range(500)]
    assert not {EOS, 5} & set(sample(logits[:1].expand(500, 10), random_rows).token_ids.tolist())


def test_advance_matches_a_batch_rebuilt_from_rows():
    # Multi-step decoding advances the batch on the device; it must equal rebuilding it with the new tokens.
    rng, vocab = random.Random(3), 30
    rows = [row(rng.getrandbits(64), prompt=[1, 2, 2], output=[rng.randrange(vocab) for _ in range(rng.randrange(3))],
                **rng.choice([dict(temperature=0.0), dict(top_p=0.9)]), min_tokens=3, stop_token_ids=[4],
                repetition_penalty=rng.choice([1.0, 1.5]), frequency_penalty=rng.choice([0.0, 0.7]))
            for _ in range(8)]
    batch = batch_of(rows, vocab)
    for _ in range(4):
        logits = torch.randn(8, vocab)
        logits[:, [EOS, 4]] += 5        # tempting stop tokens: min_tokens must hold them back, then let go
        token_ids = sampler(logits, batch).token_ids
        batch.advance(token_ids)
        rows = [SamplingRow(r.params, r.seed, [*r.token_ids, t], r.num_prompt_tokens)
                for r, t in zip(rows, token_ids.tolist())]
        rebuilt = batch_of(rows, vocab)
        assert torch.equal(batch.steps, rebuilt.steps)
        assert torch.equal(batch.penalties.output_counts, rebuilt.penalties.output_counts)
        assert torch.equal(batch.penalties.seen, rebuilt.penalties.seen)
        next_logits = torch.randn(8, vocab)
        next_logits[:, [EOS, 4]] += 5
        assert torch.equal(sampler(next_logits, batch).token_ids, sampler(next_logits, rebuilt).token_ids)


# ---- seeded randomness ------------------------------------------------------------------------------------------

def random_params(rng: random.Random) -> dict:
    return rng.choice([dict(temperature=0.0), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
                       dict(min_p=0.1, logprobs=3), dict(top_k=8, top_p=0.9, repetition_penalty=1.3),
                       dict(frequency_penalty=0.5, min_tokens=4, stop_token_ids=[1])])


def test_seeded_rows_are_independent_of_batch_composition():
    rng = random.Random(0)
    vocab = 64
    for trial in range(12):
        target = row(rng.getrandbits(64), prompt=[1, 2, 3], output=[rng.randrange(vocab) for _ in range(trial)],
                     **random_params(rng))
        target_logits = torch.randn(1, vocab) * 2
        alone = sample(target_logits, [target]).token_ids.item()
        assert sample(target_logits, [target]).token_ids.item() == alone
        for size in (2, 64):
            others = [row(rng.getrandbits(64), output=[rng.randrange(vocab)], **random_params(rng))
                      for _ in range(size - 1)]
            position = rng.randrange(size)
            rows = others[:position] + [target] + others[position:]
            logits = torch.randn(size, vocab) * 2
            logits[position] = target_logits[0]
            assert sample(logits, rows).token_ids[position].item() == alone


def test_different_seeds_and_steps_give_different_streams():
    logits = torch.zeros(1, 1000)
    first_tokens = {sample(logits, [row(seed)]).token_ids.item() for seed in range(64)}
    tokens_over_steps = {sample(logits, [row(7, output=[0] * step)]).token_ids.item() for step in range(64)}
    # 64 uniform draws from 1000 collide about twice; a stream that ignored seed or step gives one token.
    assert len(first_tokens) >= 55 and len(tokens_over_steps) >= 55


# ---- filters and the sampling distribution ----------------------------------------------------------------------

FILTERS = {
    "top_k": lambda rng: dict(top_k=rng.choice([0, rng.randint(1, 8)])),   # 0: rows with top-k off ride along
    "top_p": lambda rng: dict(top_p=rng.uniform(0.05, 0.95)),
    "min_p": lambda rng: dict(min_p=rng.uniform(0.01, 0.6)),
    "all": lambda rng: dict(top_k=rng.choice([0, 3, 10]), top_p=rng.choice([1.0, rng.uniform(0.2, 0.95)]),
                            min_p=rng.choice([0.0, rng.uniform(0.01, 0.5)])),
}


@pytest.mark.parametrize("kind", FILTERS)
def test_filters_only_emit_allowed_tokens(kind):
    # Each kind gets its own batches, so top-k alone takes the topk path and the others the sort path.
    rng, vocab, n = random.Random(kind), 40, 512
    rows = [row(rng.getrandbits(64), temperature=rng.uniform(0.3, 2.0), **FILTERS[kind](rng)) for _ in range(n)]
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 3
    token_ids = sample(logits, rows).token_ids.tolist()
    outside_mass = 0.0
    for t, lr, r in zip(token_ids, logits.tolist(), rows):
        assert t in ref_filtered_probs(lr, r.params, tol=1e-4)
        unfiltered = ref_filtered_probs(lr, SamplingParams(temperature=r.params.temperature))
        allowed = ref_filtered_probs(lr, r.params)
        outside_mass += sum(q for v, q in unfiltered.items() if v not in allowed)
    assert outside_mass > 30   # an unfiltered sampler would emit ~30+ forbidden tokens here: the test has teeth


def test_tiny_top_p_keeps_the_top_token():
    logits = torch.randn(200, 30)
    out = sample(logits, [row(seed, top_p=1e-9) for seed in range(200)])
    assert torch.equal(out.token_ids, logits.argmax(-1))


CHI2_CRITICAL = 41.0   # chi-square upper 1e-6 quantile for 7 degrees of freedom (fewer dof: stricter still)


@pytest.mark.parametrize("groups", [
    [dict(temperature=0.7)], [dict(temperature=1.5, top_k=4)], [dict(temperature=1.0, top_p=0.8)],
    [dict(temperature=1.2, min_p=0.15)],
    [dict(temperature=1.5, top_k=4), dict(temperature=1.5)],   # rows with top-k off beside rows with it on
])
@pytest.mark.parametrize("vary", ["seed", "step"])
def test_empirical_distribution_matches_softmax(groups, vary):
    logits, n = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], 8_000
    params = [SamplingParams(**g) for g in groups]
    if vary == "seed":
        rows = [SamplingRow(params[i % len(params)], i, [], 0) for i in range(n)]
    else:   # 16 seeds x 500 steps: successive steps of one sequence must be independent draws too
        outputs = [[0] * step for step in range(500)]
        rows = [SamplingRow(params[i % len(params)], 12345 + i // 500, outputs[i % 500], 0) for i in range(n)]
    token_ids = sample(torch.tensor([logits]).expand(n, 8), rows).token_ids
    for g, p in enumerate(params):
        counts = torch.bincount(token_ids[g::len(params)], minlength=8).tolist()
        expected, m = ref_filtered_probs(logits, p), sum(counts)
        assert all(c == 0 for v, c in enumerate(counts) if v not in expected)
        chi2 = sum((counts[v] - m * q) ** 2 / (m * q) for v, q in expected.items())
        assert chi2 < CHI2_CRITICAL, (chi2, counts, expected)


# ---- logprobs and interface details -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_model_logprobs(dtype):
    logits = (torch.randn(5, 50) * 2).to(dtype)
    rows = [row(0, logprobs=None), row(1, logprobs=0, temperature=0.5, repetition_penalty=1.5, output=[3, 4]),
            row(2, logprobs=3, presence_penalty=1.0, output=[7]), row(3, logprobs=7, temperature=0.0), row(4)]
    out = sample(logits, rows)
    raw = logits.float().log_softmax(-1)
    assert out.top_logprobs.shape == out.top_token_ids.shape == (5, 7)
    assert torch.equal(out.top_logprobs, raw.topk(7, dim=-1).values)
    assert torch.equal(raw.gather(1, out.top_token_ids), out.top_logprobs)
    assert torch.equal(out.logprobs, raw[torch.arange(5), out.token_ids])


def test_logprobs_absent_or_empty():
    logits = torch.randn(3, 20)
    none = sample(logits, [row(b) for b in range(3)])
    assert none.logprobs is none.top_token_ids is none.top_logprobs is None
    zero = sample(logits, [row(0, logprobs=0), row(1), row(2)])
    assert zero.top_token_ids.shape == (3, 0) and zero.logprobs.shape == (3,)


def test_input_untouched_and_padded_vocab_never_sampled():
    logits = torch.randn(64, 40)
    logits[:, 32:] = 100.0                        # an lm_head padded from 32 to 40 columns
    before = logits.clone()
    rows = [row(seed, repetition_penalty=1.2, output=[1], min_tokens=2, top_p=0.9) for seed in range(64)]
    out = sampler(logits, SamplingBatch.from_rows(rows, 32, {EOS}, "cpu"))
    assert out.token_ids.max() < 32 and torch.equal(logits, before)


def test_compiled_uniform_gives_the_eager_bits():
    """The GPU draws through torch.compile (one fused kernel); it must be the same function, bit for bit, at
    every batch size (the compiled graph is dynamic in B) and at Llama-3's vocabulary."""
    from engine.sampler import _counters, _fused_uniform, _uniform
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled = _fused_uniform()
    for batch in (1, 3, 64):
        seeds = torch.randint(-2**63, 2**63 - 1, (batch,), device=device)
        steps = torch.randint(0, 10_000, (batch,), device=device)
        counters = _counters(128_256, torch.device(device))
        assert torch.equal(compiled(seeds, steps, counters), _uniform(seeds, steps, counters))
    # Compiled in this process: Inductor's pool of compile workers (a process per core, each importing torch)
    # would boot in the background, beside the first requests a server serves after its warm-up.
    pool = [argv(pid) for pid in descendants(os.getpid()) if "compile_worker" in " ".join(argv(pid))]
    assert not pool, pool


# ---- logit_bias, allowed_token_ids, bad_words -------------------------------------------------------------------

def ref_masked(logits: list[float], r: SamplingRow) -> list[float]:
    """allowed_token_ids, then bad words (a word's last token, where the output ends with the rest of it), then
    logit_bias: what the sampler applies before penalties."""
    p, out = r.params, list(logits)
    if p.allowed_token_ids is not None:
        out = [x if v in p.allowed_token_ids else -math.inf for v, x in enumerate(out)]
    output = list(r.output_token_ids)
    for word in p.bad_words_token_ids or ():
        if len(word) == 1 or output[len(output) - len(word) + 1:] == word[:-1] and len(output) >= len(word) - 1:
            out[word[-1]] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    return out


masked_rows = st.builds(
    lambda seed, output, allowed, words, bias, greedy: row(
        seed, output=output, allowed_token_ids=allowed, bad_words_token_ids=words, logit_bias=bias,
        temperature=0.0 if greedy else 1.0),
    st.integers(0, 2**64), st.lists(st.integers(0, 11), max_size=6),
    st.one_of(st.none(), st.lists(st.integers(0, 11), min_size=4, max_size=8)),
    st.one_of(st.none(), st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=3), max_size=4)),
    st.one_of(st.none(), st.dictionaries(st.integers(0, 11), st.floats(-100, 100), max_size=4)),
    st.booleans())


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(masked_rows, min_size=1, max_size=6), logits_seed=st.integers(0, 2**32 - 1))
def test_allowed_bad_words_and_logit_bias_match_reference(rows, logits_seed):
    logits = torch.randn(len(rows), 12, generator=torch.Generator().manual_seed(logits_seed)) * 3
    batch = batch_of(rows, 12)
    reference = [ref_masked(lr, r) for lr, r in zip(logits.tolist(), rows)]
    token_ids = sampler(logits, batch).token_ids.tolist()
    for t, ref, r in zip(token_ids, reference, rows):
        if max(ref) == -math.inf:
            continue                      # every token banned: nothing is right
        assert ref[t] > -math.inf         # never a banned or disallowed token, greedy or not
        if r.params.greedy:
            assert ref[t] >= max(ref) - 1e-4


def test_logit_bias_decides_greedy_and_random_rows():
    logits = torch.randn(1, 50).expand(400, 50)
    top = int(logits[0].argmax())
    banned = sample(logits, [row(seed, logit_bias={top: -100}, temperature=0.0 if seed % 2 else 1.0)
                             for seed in range(400)]).token_ids
    assert top not in banned.tolist()
    forced = sample(logits, [row(seed, logit_bias={7: 100}, temperature=0.0 if seed % 2 else 1.0)
                             for seed in range(400)]).token_ids
    assert set(forced.tolist()) == {7}
    assert set(sample(logits, [row(seed) for seed in range(400)]).token_ids.tolist()) != {7}   # not by chance


def test_allowed_token_ids_restrict_sampling():
    logits = torch.randn(1, 50).expand(500, 50)
    allowed = [3, 11, 40]
    out = sample(logits, [row(seed, allowed_token_ids=allowed, temperature=2.0) for seed in range(500)])
    assert set(out.token_ids.tolist()) == set(allowed)            # all of them, and nothing else
    greedy = sample(logits[:1], [row(allowed_token_ids=allowed, temperature=0.0)]).token_ids.item()
    assert greedy == max(allowed, key=lambda t: logits[0, t])


def test_bad_words_advance_on_the_device():
    # Multi-step decoding advances `recent` on the device, for every row or the masked ones: it must equal the
    # batch rebuilt from the rows' new outputs.
    rng, vocab = random.Random(5), 16
    words = [[4], [5, 6], [7, 8, 9], [5, 9]]
    rows = [row(rng.getrandbits(64), output=[rng.randrange(vocab) for _ in range(rng.randrange(4))],
                bad_words_token_ids=words, temperature=rng.choice([0.0, 1.0])) for _ in range(6)]
    batch = batch_of(rows, vocab)
    for step in range(6):
        token_ids = torch.tensor([rng.choice([5, 7, 8, 6, 9, 1]) for _ in rows])
        mask = torch.tensor([rng.random() < 0.7 for _ in rows]) if step % 2 else None
        batch.advance(token_ids, mask)
        rows = [SamplingRow(r.params, r.seed, [*r.token_ids, t] if mask is None or m else list(r.token_ids),
                            r.num_prompt_tokens)
                for r, t, m in zip(rows, token_ids.tolist(), (mask if mask is not None else [True] * 6))]
        rebuilt = batch_of(rows, vocab)
        assert torch.equal(batch.bad_words.recent, rebuilt.bad_words.recent)
        logits = torch.randn(len(rows), vocab)
        logits[:, [4, 6, 9]] += 4        # the banned tokens tempt
        sampled = sampler(logits, batch).token_ids.tolist()
        for t, r in zip(sampled, rows):
            assert ref_masked([0.0] * vocab, r)[t] > -math.inf
