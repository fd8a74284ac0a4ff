"""use_beam_search (vLLM's extension) through the whole pipeline, with the official openai client: the same beams as
LLM.beam_search offline, on completions and chat, streamed or not; the KV blocks the beams shared in /metrics; bad
parameters answered with 400s while the server goes on serving."""
from __future__ import annotations

import time

import openai
import pytest

from engine import BeamSearchParams

MODEL = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"   # > one block
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 5


def test_completions_beam_search_equals_offline(client, offline, serve_stack):
    [want] = offline.beam_search(PROMPT, BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))
    r = client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"use_beam_search": True, "best_of": 3})
    assert [c.text for c in r.choices] == [s.text for s in want.sequences[:2]]
    assert [c.finish_reason for c in r.choices] == [s.finish_reason for s in want.sequences[:2]]
    prompt_tokens = len(offline.tokenizer.encode(PROMPT))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == sum(len(s.tokens) - prompt_tokens for s in want.sequences[:2])

    # Streamed: each beam's text arrives when the search ends, under its choice index.
    texts = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=MAX_TOKENS, stream=True,
                                           extra_body={"use_beam_search": True, "best_of": 3}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [s.text for s in want.sequences[:2]]

    # The beams shared the prompt's full block (16 tokens): the scheduler counts what that saved.
    deadline = time.monotonic() + 10
    while (serve_stack.metric("pagestream_beam_searches_total") or 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    m = serve_stack.metrics()
    assert m["pagestream_beam_searches_total", ()] >= 2
    assert m["pagestream_beam_search_kv_blocks_saved_peak_total", ()] >= 2 * 2      # 2 searches, 2 beams beyond one
    assert ("pagestream_beam_search_kv_blocks_saved", ()) in m


def test_chat_beam_search_equals_offline(client, offline):
    [want] = offline.beam_search(QUESTION, BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS,
                                                            length_penalty=0.5))
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=MAX_TOKENS,
                                       extra_body={"use_beam_search": True, "best_of": 2, "length_penalty": 0.5})
    assert [c.message.content for c in r.choices] == [want.sequences[0].text]
    # Without best_of, the beam width is n: every beam comes back.
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=MAX_TOKENS, n=2,
                                       extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.message.content for c in r.choices] == [s.text for s in want.sequences]


@pytest.mark.parametrize("body, message", [
    ({"temperature": 0.7}, "temperature must be 0"),
    ({"best_of": 11}, "beam width"),
    ({"n": 3, "best_of": 2}, "n (3)"),                 # best_of below n
    ({"stop": ["."]}, "stop strings"),
    ({"logprobs": 2}, "logprobs"),
    ({"top_p": 0.5}, "top_p"),
    ({"presence_penalty": 0.5}, "penalties"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"use_beam_search": False, "length_penalty": 2.0}, "length_penalty needs use_beam_search"),
    ({"use_beam_search": "yes"}, "use_beam_search must be a boolean"),
])
def test_bad_beam_search_parameters_are_400s(client, body, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4,
                                  extra_body={"use_beam_search": True, **body})
    assert e.value.status_code == 400
    assert message in e.value.response.json()["error"]["message"]
    # ... and the server goes on serving.
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"use_beam_search": True})
    assert r.choices[0].finish_reason in ("length", "stop")
