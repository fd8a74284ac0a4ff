"""Incremental detokenization: streamed pieces add up to the whole decode; stop strings cut the text, and a tail
that may still become a stop string is held back until it is decided."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine.detokenizer import IncrementalDetokenizer
from schemas.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: every byte is a token, so multi-byte characters span several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def stream(tok, text: str, params: SamplingParams, prompt: str = "Q: ") -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt).ids, params)
    pieces = [detok.add([t]) for t in tok.encode(text).ids]
    if detok.stop_reason is None:
        pieces.append(detok.flush())
    return pieces, detok


def test_pieces_add_up_and_hold_back_incomplete_utf8(byte_tokenizer):
    text = "héllo 日本語 🙂 done"
    pieces, detok = stream(byte_tokenizer, text, SamplingParams())
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in p for p in pieces)          # never half a character
    assert pieces.count("") >= len(text.encode()) - len(text)   # the extra bytes of multi-byte chars wait


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_text(byte_tokenizer, include):
    params = SamplingParams(stop=["STOP", "never"], include_stop_str_in_output=include)
    pieces, detok = stream(byte_tokenizer, "one two STOP three", params)
    assert detok.stop_reason == "STOP"
    assert "".join(pieces) == ("one two STOP" if include else "one two ")


def test_possible_stop_prefix_is_held_then_released(byte_tokenizer):
    params = SamplingParams(stop=["<end>"])
    detok = IncrementalDetokenizer(byte_tokenizer, [], params)
    out = "".join(detok.add([t]) for t in byte_tokenizer.encode("a <en").ids)
    assert out == "a "                                    # "<en" could still become "<end>"
    out += "".join(detok.add([t]) for t in byte_tokenizer.encode("try").ids)
    assert out == "a <entry" and detok.stop_reason is None


def test_stop_string_spanning_tokens_found_once(byte_tokenizer):
    params = SamplingParams(stop=["ab", "b"])
    pieces, detok = stream(byte_tokenizer, "xxab yy", params)
    assert detok.stop_reason == "ab" and "".join(pieces) == "xx"


@pytest.mark.parametrize("stop", [[], ["STOP"], ["ab", "b"]])
@pytest.mark.parametrize("size", [2, 3, 7, 100])
def test_tokens_in_batches_make_the_same_text_as_one_by_one(byte_tokenizer, stop, size):
    """Several tokens go through the stream in one call (the cheap way): the same text, the same stop."""
    params = SamplingParams(stop=stop)
    ids = byte_tokenizer.encode("xx héllo 日本語 🙂 STOP ab three").ids
    one, _ = stream(byte_tokenizer, "xx héllo 日本語 🙂 STOP ab three", params)
    detok = IncrementalDetokenizer(byte_tokenizer, byte_tokenizer.encode("Q: ").ids, params)
    pieces = [detok.add(ids[i:i + size]) for i in range(0, len(ids), size)]
    if detok.stop_reason is None:
        pieces.append(detok.flush())
    assert "".join(pieces) == "".join(one)
    assert detok.stop_reason == (stop[0] if stop else None)
    assert all("\ufffd" not in p for p in pieces)
