"""Beam search (LLM.beam_search, vLLM's API) on the default model: the same beams and scores as a plain beam search
written here (full forward passes through transformers, no KV cache, vLLM's scoring), with the beams sharing their
prefix's KV blocks, under preemption, and beside ordinary requests running multi-step plans."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams
from engine.beam_search import beam_search_score
from engine.llm_engine import LLMEngine
from engine.model_files import resolve_model
from schemas.beam_search_params import check_beam_search

PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def llm():
    return LLM(progress=False, max_model_len=512)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM
    path = resolve_model("smollm2-135m-instruct", progress=False).path
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_beam_search(model, prompt: list[int], width: int, max_tokens: int, eos: frozenset[int],
                          length_penalty: float = 1.0, ignore_eos: bool = False) -> list[tuple[list[int], float]]:
    """vLLM's beam search, plainly: every step a full forward pass over each beam's whole sequence; each beam's top
    2 x width tokens; EOS continuations set aside as completed; the best `width` others go on. At the end the best
    `width` of completed and live, by cumulative logprob / length ** length_penalty."""
    def score(beam):
        return beam_search_score(beam[0], beam[1], eos, length_penalty)

    beams, completed = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            with torch.no_grad():
                logprobs = model(torch.tensor([tokens])).logits[0, -1].float().log_softmax(-1)
            top = logprobs.topk(2 * width)
            for logprob, token in zip(top.values.tolist(), top.indices.tolist()):
                beam = (tokens + [token], cum + logprob)
                (completed if token in eos and not ignore_eos else candidates).append(beam)
        beams = sorted(candidates, key=score, reverse=True)[:width]
    return sorted(completed + beams, key=score, reverse=True)[:width]


def assert_same_beams(output, expected, eos, length_penalty=1.0):
    assert len(output.sequences) == len(expected)
    for got, (tokens, cum) in zip(output.sequences, expected):
        assert got.tokens == tokens
        assert got.cum_logprob == pytest.approx(cum, abs=2e-3)
        assert beam_search_score(got.tokens, got.cum_logprob, eos, length_penalty) == \
            pytest.approx(beam_search_score(tokens, cum, eos, length_penalty), abs=2e-3)
    scores = [beam_search_score(s.tokens, s.cum_logprob, eos, length_penalty) for s in output.sequences]
    assert scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def expected(llm, hf_model):
    """The reference beams of each prompt, at widths 2 and 3."""
    eos = llm.engine.scheduler.eos_token_ids
    return {(p, w): reference_beam_search(hf_model, llm.tokenizer.encode(p), w, MAX_TOKENS, eos)
            for p in PROMPTS for w in (2, 3)}


@pytest.mark.parametrize("width", [2, 3])
def test_beam_search_equals_plain_reference(llm, expected, width):
    eos = llm.engine.scheduler.eos_token_ids
    outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS))
    for prompt, output in zip(PROMPTS, outputs):
        assert_same_beams(output, expected[prompt, width], eos)
        # The text is the generated tokens' (an EOS is not shown).
        for seq in output.sequences:
            generated = seq.tokens[len(llm.tokenizer.encode(prompt)):]
            assert seq.text == llm.tokenizer.decode(generated)
    assert llm.engine.stats().kv.num_used_blocks == 0           # every beam's blocks came back


def test_length_penalty_and_ignore_eos_equal_reference(llm, hf_model):
    eos = llm.engine.scheduler.eos_token_ids
    prompt = PROMPTS[0]
    want = reference_beam_search(hf_model, llm.tokenizer.encode(prompt), 2, 4, eos, length_penalty=0.5,
                                 ignore_eos=True)
    [got] = llm.beam_search(prompt, BeamSearchParams(2, 4, ignore_eos=True, length_penalty=0.5))
    assert_same_beams(got, want, eos, length_penalty=0.5)
    assert all(s.finish_reason == "length" for s in got.sequences)


def test_beams_share_the_prefix_blocks(expected):
    """With blocks of 4 tokens, every full block of the prompt is held once by all the beams: independent
    sequences would hold each of them width times."""
    llm = LLM(progress=False, max_model_len=512, block_size=4)
    eos = llm.engine.scheduler.eos_token_ids
    prompt = PROMPTS[1]
    [output] = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))
    assert_same_beams(output, expected[prompt, 3], eos)
    full_prompt_blocks = len(llm.tokenizer.encode(prompt)) // 4
    assert full_prompt_blocks >= 4
    assert output.kv_blocks_saved >= 2 * full_prompt_blocks
    assert llm.engine.stats().kv.num_used_blocks == 0


@pytest.mark.parametrize("steps", [1, 8])
def test_preemption_keeps_the_beams(expected, steps):
    """A KV pool of 18 blocks of 4 cannot hold both searches' beams and two greedy requests beside them: sequences
    are preempted and recomputed, and the beams still end as the reference's."""
    llm = LLM(progress=False, max_model_len=512, block_size=4, num_blocks=18, num_scheduler_steps=steps)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):            # first: the beams come later in service order, preempted first
        engine.add_request(f"greedy-{i}", prompt, greedy)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"beams-{i}", prompt, beam_search=BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))
    preempted, preempt = [], engine.scheduler._preempt

    def recording(seq, plan):
        preempted.append(seq.request_id)
        preempt(seq, plan)

    engine.scheduler._preempt = recording
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step(stream=False):
            done[out.request_id] = out
    assert any(r.startswith("beams") for r in preempted)
    for i, prompt in enumerate(PROMPTS):
        got = done[f"beams-{i}"]
        want = expected[prompt, 3]
        assert [got.prompt_token_ids + c.token_ids for c in got.outputs] == [tokens for tokens, _ in want]
        assert [c.cumulative_logprob for c in got.outputs] == pytest.approx([cum for _, cum in want], abs=2e-3)
        assert len(done[f"greedy-{i}"].outputs[0].token_ids) == 12
    assert engine.stats().kv.num_used_blocks == 0


def test_other_requests_keep_multi_step_plans(llm, expected):
    """Beams take one step per plan; a greedy request beside them still gets plans of several steps, and its
    tokens are those it gets alone."""
    engine: LLMEngine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], greedy)[0].outputs[0].token_ids
    engine.add_request("beams", PROMPTS[0], beam_search=BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS))
    engine.add_request("greedy", PROMPTS[1], greedy)
    scheduler, steps, done = engine.scheduler, [], {}
    schedule = scheduler.schedule

    def recording():
        plan = schedule()
        beams = [s for s in plan.num_scheduled_tokens if scheduler.get_sequence(s) is not None
                 and scheduler.get_sequence(s).request_id == "beams"]
        steps.append((plan.num_steps, [plan.num_scheduled_tokens[s] for s in beams]))
        return plan

    scheduler.schedule = recording
    try:
        while engine.has_unfinished_requests():
            for out in engine.step(stream=False):
                done[out.request_id] = out
    finally:
        del scheduler.schedule
    assert done["greedy"].outputs[0].token_ids == alone
    want = expected[PROMPTS[0], 2]
    assert [done["beams"].prompt_token_ids + c.token_ids for c in done["beams"].outputs] == [t for t, _ in want]
    assert any(num_steps > 1 and beams for num_steps, beams in steps)       # multi-step with beams in the plan
    assert steps[0][1] == [len(done["beams"].prompt_token_ids)]             # the first plan prefills the prompt
    assert all(n == 1 for _, beams in steps[1:] for n in beams)             # then a beam computes one token a plan


def test_invalid_beam_search_parameters():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)
    beam = BeamSearchParams(beam_width=2, max_tokens=4)
    for bad, message in [(dict(stop=["."]), "stop strings"), (dict(top_p=0.5), "top_p"),
                         (dict(presence_penalty=1.0), "penalties"), (dict(logprobs=2), "logprobs"),
                         (dict(n=3), "beam width"), (dict(min_tokens=1), "min_tokens")]:
        params = SamplingParams(**{**dict(n=2, temperature=0, max_tokens=4), **bad})
        with pytest.raises(ValueError, match=message):
            check_beam_search(params, beam)


def test_engine_refuses_what_it_cannot_hold(llm):
    with pytest.raises(ValueError, match="beam search of width 3"):
        LLM(progress=False, max_model_len=512, block_size=4, num_blocks=8).beam_search(
            PROMPTS[0], BeamSearchParams(beam_width=3, max_tokens=20))
    with pytest.raises(ValueError, match="stop strings"):
        llm.engine.add_request("bad", PROMPTS[0], SamplingParams(n=2, temperature=0, max_tokens=4, stop=["."]),
                               beam_search=BeamSearchParams(beam_width=2, max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
