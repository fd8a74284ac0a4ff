"""engine/tokenizer.py's loader: which tokenizer a model is served with, its EOS ids, and a dummy-weight model's
vocabulary sized to the tokenizer it is given."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from conftest import TINY
from engine import LLM, SamplingParams
from engine.model_files import resolve_model
from engine.tokenizer import VOCAB_MULTIPLE, Tokenizer, eos_token_ids, load_tokenizer

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory):
    """A directory with only a config.json: a tiny shape for dummy weights (vocabulary 512, EOS 2)."""
    path = tmp_path_factory.mktemp("tiny-shape")
    LlamaConfig(**TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A tokenizer of 100 tokens (not a multiple of 64) with its EOS, saved as transformers saves one."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 100)}}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("word-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return path


def test_the_model_directory_tokenizer_unless_none():
    files = resolve_model(ALIAS, progress=False)
    tokenizer = load_tokenizer(files)
    assert isinstance(tokenizer, Tokenizer) and tokenizer.path == files.path
    assert eos_token_ids(files, tokenizer) == tokenizer.eos_token_ids == {2}
    assert load_tokenizer(files, "none") is None


def test_dummy_weights_have_none_and_take_eos_from_the_config(tiny_shape):
    files = resolve_model(str(tiny_shape), "dummy")
    assert load_tokenizer(files) is None and files.config["vocab_size"] == 512
    assert eos_token_ids(files, None) == {2}
    files.config["eos_token_id"] = [2, 7]                       # Llama 3 style: several
    assert eos_token_ids(files, None) == {2, 7}


def test_a_tokenizer_given_to_dummy_weights_sizes_their_vocabulary(tiny_shape, word_tokenizer):
    files = resolve_model(str(tiny_shape), "dummy")
    tokenizer = load_tokenizer(files, str(word_tokenizer))
    assert tokenizer.vocab_size == 100
    assert files.config["vocab_size"] == 128 and 128 % VOCAB_MULTIPLE == 0     # padded up
    assert eos_token_ids(files, tokenizer) == {1}                               # the tokenizer's, not the shape's
    files = resolve_model("smollm2-135m", "dummy")
    files.config["vocab_size"] = 7
    assert len(load_tokenizer(files, ALIAS).hf) == files.config["vocab_size"] == 49152   # an alias, resolved


def test_a_tokenizer_given_to_real_weights_leaves_their_vocabulary(tiny_model_dir, word_tokenizer):
    files = resolve_model(str(tiny_model_dir("llama")))
    assert load_tokenizer(files, str(word_tokenizer)).vocab_size == 100 and files.config["vocab_size"] == 512


def test_an_explicit_tokenizer_must_load(tiny_shape, tmp_path):
    files = resolve_model(str(tiny_shape), "dummy")
    with pytest.raises(ValueError, match=r"tokenizer 'no-such-tokenizer': model 'no-such-tokenizer' does not exist"):
        load_tokenizer(files, "no-such-tokenizer")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(files, str(tmp_path))


def test_dummy_weights_with_a_tokenizer_generate_text(tiny_shape):
    llm = LLM(str(tiny_shape), load_format="dummy", tokenizer=ALIAS, progress=False)
    assert llm.engine.vocab_size == 49152
    out = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8 and out.prompt_token_ids == llm.tokenizer.encode("Hello")
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_the_tokenizer_loads_as_autotokenizer_does_without_the_model_config_class(word_tokenizer, tiny_shape):
    """Tokenizer hands AutoTokenizer the generic config class where tokenizer_config.json names the tokenizer
    class (engine/tokenizer.py:_plain_config): the same tokenizer as AutoTokenizer's own, and the model's config
    module (which imports most of transformers) is never imported. Checked in a fresh process, on SmolLM2's
    files and on a word tokenizer beside a Llama config.json."""
    import shutil
    import subprocess
    import sys
    from transformers import AutoTokenizer

    beside = tiny_shape.parent / "word-beside-config"
    shutil.copytree(word_tokenizer, beside, dirs_exist_ok=True)
    shutil.copy(tiny_shape / "config.json", beside / "config.json")
    for path in (resolve_model(ALIAS).path, beside):
        ours, theirs = Tokenizer(path).hf, AutoTokenizer.from_pretrained(path, local_files_only=True)
        text = "w3 w7 Hello world, <|im_start|>user\n tabs\tand  spaces"
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
        assert ours.eos_token_id == theirs.eos_token_id and ours.chat_template == theirs.chat_template
        assert ours.all_special_tokens == theirs.all_special_tokens
    probe = ("import sys; from engine.tokenizer import Tokenizer; Tokenizer(sys.argv[1]); "
             "print(sorted(m for m in sys.modules if m.startswith('transformers.models.llama')))")
    for path in (resolve_model(ALIAS).path, beside):
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", out.stdout
