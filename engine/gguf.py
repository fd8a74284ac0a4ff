"""GGUF: read llama.cpp's model files, and convert them to a Hugging Face model directory.

A GGUF file is: magic, version, counts; metadata (key -> typed value); a table of tensor infos (name, dims,
ggml type, offset); then the tensor data, from an aligned offset. Quantized tensors are runs of fixed-size
blocks, each holding `block_size` weights as small integers with one or two float16 scales.

    reader = GGUFReader("model.gguf")
    reader.metadata["general.architecture"]     # "llama"
    reader.tensor("blk.0.attn_q.weight")        # float32 array, shape (out_features, in_features)
    convert_gguf("model.gguf", "model_dir")     # config.json, model.safetensors, tokenizer.json, ...

Format facts come from ggml's docs/gguf.md and ggml-quants.c; the code is our own.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

CONVERTER_VERSION = 1                 # part of the cache key: bump when the output of convert_gguf changes

# metadata value types: fixed-size ones as struct/numpy formats (little-endian); 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor type id -> (name, weights per block, bytes per block), for the types we dequantize
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
              14: ("Q6_K", 256, 210)}
# names of the others, for error messages
_OTHER_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
                25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def ggml_type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else _OTHER_TYPES.get(ggml_type, f"type {ggml_type}")


# ---- Reading ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]     # numpy order: GGUF's dims reversed, so the last axis is ggml's fastest-varying ne[0]
    offset: int                # absolute byte offset in the file


class _Cursor:
    """Reads little-endian values from a buffer, moving forward."""

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise struct.error(f"{n} bytes at byte {self.pos} run past the end")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")
        etype, n = self.scalar("<I"), self.scalar("<Q")
        if etype in _SCALARS:  # one numpy read for the long ones, like token types and scores
            fmt = _SCALARS[etype]
            return np.frombuffer(self.take(n * struct.calcsize(fmt)), dtype=fmt).tolist()
        return [self.value(etype) for _ in range(n)]


class GGUFReader:
    """Parses a GGUF v2/v3 file's metadata and tensor table; tensor data stays memory-mapped until asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(self._data[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        try:
            self._parse(_Cursor(memoryview(self._data), 4))
        except (struct.error, UnicodeDecodeError) as e:   # ran off the end, or garbage where text should be
            raise ValueError(f"{self.path}: corrupt or truncated GGUF header ({e})") from e

    def _parse(self, cur: _Cursor) -> None:
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", self.version))[0] in (2, 3)
            raise ValueError(f"{self.path}: " + ("big-endian GGUF files are not supported" if swapped
                                                 else f"unsupported GGUF version {self.version}"))
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, cur.scalar("<I"), tuple(reversed(dims)), cur.scalar("<Q")))
        alignment = self.metadata.get("general.alignment", 32)
        self.data_offset = -(-cur.pos // alignment) * alignment   # tensor data starts at the next aligned byte
        self.tensors = {name: GGUFTensor(name, t, shape, self.data_offset + off) for name, t, shape, off in infos}

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new float32 array."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            raise ValueError(f"tensor {name!r} has ggml type {ggml_type_name(info.ggml_type)}, which we cannot "
                             f"dequantize (supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
        _, block_size, block_bytes = GGML_TYPES[info.ggml_type]
        n = int(np.prod(info.shape))
        if n % block_size:
            raise ValueError(f"tensor {name!r}: {n} weights is not a whole number of {block_size}-weight blocks")
        end = info.offset + n // block_size * block_bytes
        if end > len(self._data):
            raise ValueError(f"{self.path} is truncated: tensor {name!r} ends at byte {end}")
        return dequantize(self._data[info.offset:end], info.ggml_type).reshape(info.shape)


# ---- Dequantization ------------------------------------------------------------------------------------
# Each function maps blocks, (n_blocks, bytes per block) uint8, to weights, (n_blocks, block_size) float32.

def _f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): weights 0..15 are the low nibbles, 16..31 the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes -> (n, 32): bit j of the little-endian uint32 is weight j's fifth bit."""
    return (qh.view("<u4") >> np.arange(32, dtype=np.uint32)) & 1


def _q8_0(b):  # d, 32 x int8
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b):  # d, 16 bytes of nibbles; w = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).astype(np.float32) - 8)


def _q4_1(b):  # d, m, 16 bytes of nibbles; w = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def _q5_0(b):  # d, 4 bytes of fifth bits, 16 bytes of nibbles; w = d * (q - 16)
    q = _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6]) << 4
    return _f16(b[:, :2]) * (q.astype(np.float32) - 16)


def _q5_1(b):  # d, m, fifth bits, nibbles; w = d * q + m
    q = _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8]) << 4
    return _f16(b[:, :2]) * q.astype(np.float32) + _f16(b[:, 2:4])


def _q4_k(b):
    """d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles.
    w = d * scale[s] * q - dmin * min[s]."""
    n, s = len(b), b[:, 4:16]
    # bytes 0-3: scales 0-3 in the low 6 bits, top 2 bits of scales 4-7; bytes 4-7: the same for the mins;
    # bytes 8-11: low 4 bits of scales 4-7, and of mins 4-7 in the high nibble
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6) << 4], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
    # four 32-byte chunks: a chunk's low nibbles are sub-block 2c, its high nibbles sub-block 2c + 1
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(n, 256)


def _q6_k(b):
    """128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales (one per 16 weights), d.
    w = d * scale * (q - 32)."""
    n = len(b)
    # per 128-weight half: weights [0, 32) are the low nibbles of ql[0:32], [32, 64) of ql[32:64], [64, 96) the
    # high nibbles of ql[0:32], [96, 128) of ql[32:64]; their top 2 bits are bits 0-1, 2-3, 4-5, 6-7 of qh[0:32]
    ql = b[:, :128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=2)                          # (n, half, group, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = ((low | high << 4).astype(np.float32) - 32).reshape(n, 16, 16)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)                   # (n, 16)
    return ((_f16(b[:, 208:210]) * scales)[:, :, None] * q).reshape(n, 256)


_DEQUANTIZE = {
    0: lambda b: b.view("<f4").astype(np.float32),
    1: lambda b: _f16(b),
    30: lambda b: (b.view("<u2").astype(np.uint32) << 16).view(np.float32),  # bf16 is the top half of an f32
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 14: _q6_k,
}


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Raw tensor bytes -> flat float32 array, all blocks at once."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, GGML_TYPES[ggml_type][2])
    return _DEQUANTIZE[ggml_type](blocks).reshape(-1)


# ---- config.json -----------------------------------------------------------------------------------------

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _short(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _special_ids(md: dict) -> dict[str, int]:
    keys = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}
    return {name: md[f"tokenizer.ggml.{key}_token_id"] for name, key in keys.items()
            if f"tokenizer.ggml.{key}_token_id" in md}


def hf_config(reader: GGUFReader) -> dict:
    md, tensors = reader.metadata, reader.tensors
    arch = md["general.architecture"]
    if arch not in _ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})")
    get = lambda key, default=None: md.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "architectures": [_ARCHS[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": _short(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "rope_theta": _short(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,   # llama.cpp writes no output.weight when tied
        "torch_dtype": "float32",
    }
    if arch != "qwen2":  # Qwen2 always has q/k/v biases; the others say so in their config
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    config |= {f"{name}_token_id": i for name, i in _special_ids(md).items() if name != "unk"}
    if rope_scaling := _rope_scaling(reader, arch, config):
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(reader: GGUFReader, arch: str, config: dict) -> dict | None:
    md = reader.metadata
    kind, factor = md.get(f"{arch}.rope.scaling.type", "none"), md.get(f"{arch}.rope.scaling.factor")
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _short(factor)}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": _short(factor), "original_max_position_embeddings": original}
    if kind != "none":
        raise ValueError(f"rope scaling type {kind!r} is not supported")
    if "rope_freqs.weight" not in reader.tensors:
        return None
    # Llama 3.1+: llama.cpp stores the per-frequency divisors rather than their parameters. Every Llama 3 release
    # uses low/high frequency factors 1 and 4, so we recover the rest and check that they reproduce the tensor.
    stored = reader.tensor("rope_freqs.weight")
    scaling = {"rope_type": "llama3", "factor": _short(stored.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original or 8192}
    rotary_dim = md.get(f"{arch}.rope.dimension_count", config["head_dim"])
    if not np.allclose(llama3_rope_factors(scaling, rotary_dim, config["rope_theta"]), stored, rtol=1e-4):
        raise ValueError("rope_freqs.weight does not match Llama 3 rope scaling; cannot express it in config.json")
    return scaling


def llama3_rope_factors(scaling: dict, rotary_dim: int, theta: float) -> np.ndarray:
    """What each rotary frequency is divided by under Llama 3 scaling: 1 for short wavelengths, `factor` for long
    ones, and a smooth blend between."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    original, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                "high_freq_factor"))
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, scaling["factor"], blended))


# ---- Weights ---------------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, kind = name.rsplit(".", 1)
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart we know")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a llama Q or K projection's rows (or bias).

    Hugging Face rotates the two halves of each head against each other; ggml rotates adjacent pairs, so
    llama.cpp's converter interleaves each head's halves: rows (half, i) become (i, half). We swap them back."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(reader: GGUFReader, config: dict, path: Path, progress: bool) -> None:
    """Writes model.safetensors one tensor at a time, so memory holds one tensor, not the model."""
    names = [name for name in reader.tensors if name != "rope_freqs.weight"]   # folded into config.json
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        shape = reader.tensors[name].shape
        size = 4 * int(np.prod(shape))
        header[hf_tensor_name(name)] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                          # the data section starts 8-byte aligned
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in tqdm(names, desc=f"converting {reader.path.name}", unit="tensor", disable=not progress):
            w = reader.tensor(name)
            part = name.split(".")[2] if name.startswith("blk.") else ""
            if config["model_type"] == "llama" and part in heads:
                w = unpermute_rotary(w, heads[part])
            f.write(np.ascontiguousarray(w, dtype="<f4").data)


# ---- Tokenizer -------------------------------------------------------------------------------------------

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4      # tokenizer.ggml.token_type values

# the pre-tokenizer splits of the Hugging Face tokenizers these vocabularies come from
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_DIGIT_SPLITTERS = ("smollm", "starcoder", "refact")          # every digit its own pre-token, then GPT-2's regex
_GPT2 = ("default", "gpt2", "gpt-2")


def _byte_level_bpe(md: dict) -> Tokenizer:
    pre = md.get("tokenizer.ggml.pre", "default")
    vocab = {token: i for i, token in enumerate(md["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in md.get("tokenizer.ggml.merges", [])]
    # Llama 3's tokenizer takes a pre-token that is a whole vocabulary entry as is, before trying merges
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3")))
    if pre in _GPT2 or pre in _DIGIT_SPLITTERS:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        digits = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGIT_SPLITTERS else []
        tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    elif pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    else:
        supported = sorted({*_GPT2, *_DIGIT_SPLITTERS, *_SPLITS})
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(supported)})")
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(md: dict) -> Tokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral): GGUF keeps pieces and scores but no merges. Merging a
    pair is allowed when the merged piece exists, and the best-scoring merged piece goes first."""
    tokens, scores = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"]
    types = md.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    candidates = sorted((-scores[i], vocab[piece[:k]], vocab[piece[k:]])
                        for i, piece in enumerate(tokens) if types[i] == _NORMAL
                        for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab)
    merges = [(tokens[left], tokens[right]) for _, left, right in candidates]
    unk = tokens[md.get("tokenizer.ggml.unknown_token_id", 0)]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first" if prefix else "never", split=False)
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def _adds_bos(md: dict) -> bool:
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
    return md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama")


def _bos_processor(md: dict) -> processors.TemplateProcessing | None:
    """Puts BOS before each sequence when llama.cpp would."""
    bos_id = md.get("tokenizer.ggml.bos_token_id")
    if not _adds_bos(md) or bos_id is None:
        return None
    bos = md["tokenizer.ggml.tokens"][bos_id]
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def build_tokenizer(md: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the one the GGUF's tokenizer.ggml.* metadata describes."""
    model = md.get("tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
    if model not in builders:
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (supported: {', '.join(builders)})")
    tok = builders[model](md)
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    # control and user-defined tokens are matched whole in the text, before BPE; they keep their vocabulary ids
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    tok.post_processor = _bos_processor(md)
    return tok


def _tokenizer_config(md: dict, config: dict) -> dict:
    tokens = md["tokenizer.ggml.tokens"]
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        "model_max_length": config["max_position_embeddings"],
                        "add_bos_token": _adds_bos(md),
                        "clean_up_tokenization_spaces": False}
    tokenizer_config |= {f"{name}_token": tokens[i] for name, i in _special_ids(md).items()}
    if "tokenizer.chat_template" in md:
        tokenizer_config["chat_template"] = md["tokenizer.chat_template"]
    return tokenizer_config


# ---- Conversion ------------------------------------------------------------------------------------------

def _write_model(reader: GGUFReader, out: Path, progress: bool) -> None:
    md = reader.metadata
    config = hf_config(reader)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    files = {"config.json": config, "generation_config.json": generation}
    if "tokenizer.ggml.tokens" in md:
        build_tokenizer(md).save(str(out / "tokenizer.json"))
        files["tokenizer_config.json"] = _tokenizer_config(md, config)
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    _write_weights(reader, config, out / "model.safetensors", progress)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Writes a Hugging Face model directory (float32 safetensors, config, tokenizer) for a GGUF file.

    Atomic: the files are written into a temporary sibling directory that is renamed into place, so several
    processes may convert the same file at once; whichever finishes second uses the first one's result."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)                    # mkdtemp makes it private; the cache may be shared
        _write_model(GGUFReader(gguf_path), tmp, progress)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
