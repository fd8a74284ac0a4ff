"""The model's tokenizer: text to ids, chat conversations through the model's template, EOS ids.

Loaded with transformers (local files only). The fast Rust tokenizer underneath (`backend`) is what the
detokenizer streams through. `load_tokenizer` and `eos_token_ids` are the one way every process (the engine, the
worker, the tokenizer and detokenizer services, the gateway) finds a model's tokenizer and EOS ids, so they agree.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from engine.model_files import ModelFiles, resolve_model

# Real checkpoints pad their vocabulary to a multiple of 64 (Llama 3: 128,256; Qwen2.5: 151,936 for 151,665
# tokens) so the embedding and lm_head GEMMs tile evenly; a dummy model sized to a tokenizer keeps that property.
# The padding ids decode to nothing (the detokenizer skips ids it does not know), so sampling one is harmless.
VOCAB_MULTIPLE = 64


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.path, config=_plain_config(self.path),
                                                                         local_files_only=True)
        if not getattr(self.hf, "is_fast", False):
            raise ValueError(f"{path}: a fast (tokenizer.json) tokenizer is required")
        self.backend = self.hf.backend_tokenizer
        self.eos_token_ids = self._eos_token_ids()
        self.vocab_size = len(self.hf)

    @staticmethod
    def present_in(path: str | Path) -> bool:
        return (Path(path) / "tokenizer.json").exists() or (Path(path) / "tokenizer_config.json").exists()

    def _eos_token_ids(self) -> frozenset[int]:
        # generation_config.json may list several (Llama 3: <|end_of_text|>, <|eot_id|>, ...); the tokenizer one more.
        ids = set()
        gen = self.path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        return frozenset(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() of each text, in one call: the Rust tokenizer encodes them in parallel, without the GIL."""
        if not texts:
            return []
        return self.hf(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                       return_token_type_ids=False)["input_ids"]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id's entry in the vocabulary (byte-level BPE shows a leading space as "Ġ")."""
        return self.hf.convert_ids_to_tokens(token_ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The conversation as the model's template writes it; tools (OpenAI's function definitions) where the
        template renders them (one that does not, such as SmolLM2's, leaves them out, as with vLLM)."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use a completion prompt")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           tools=tools)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False, tools: list[dict] | None = None) -> list[int]:
        # The rendered template already holds its special tokens (BOS included where the model wants one).
        text = self.render_chat(messages, add_generation_prompt, tools)
        return self.hf.encode(text, add_special_tokens=add_special_tokens)


def _plain_config(path: Path) -> PreTrainedConfig | None:
    """config.json as the generic config class, for a tokenizer that tokenizer_config.json names: AutoTokenizer
    then reads only the config's model_type. Left to itself it loads the model's own config class, whose module
    imports most of transformers (2.5 s of every process start on a 2-core machine, more than the tokenizer
    takes; a service restarting under load waited for it). None where the class is not named (AutoTokenizer maps
    the config class to a tokenizer class then) or the tokenizer is remote code."""
    try:
        named = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(named, dict) or not named.get("tokenizer_class") or "auto_map" in named \
            or not (path / "config.json").exists():
        return None
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()     # "a model of type llama to instantiate a model of type ``"
    try:
        return PreTrainedConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None
    finally:
        transformers_logging.set_verbosity(verbosity)


def load_tokenizer(files: ModelFiles, option: str | None = None, progress: bool = False) -> Tokenizer | None:
    """The tokenizer the model is served with. An explicit option must load: "none" (run on token ids only), a
    directory, or a name resolve_model knows (the alias smollm2-135m-instruct, a .gguf file). Without one, the
    model directory's if it has one; dummy-weight and tiny test models have none, and run on token ids.

    A tokenizer given to dummy weights decides their vocabulary: files.config's vocab_size becomes the
    tokenizer's (padded to VOCAB_MULTIPLE), so every id it makes has an embedding. Every process that loads the
    model through here therefore agrees on the vocabulary (the worker's embedding, the tokenizer service's
    validation)."""
    if option == "none":
        return None
    if option:
        tokenizer = Tokenizer(_tokenizer_dir(option, progress))
    elif files.path is not None and Tokenizer.present_in(files.path):
        tokenizer = Tokenizer(files.path)
    else:
        return None
    if files.path is None:
        files.config["vocab_size"] = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return tokenizer


def eos_token_ids(files: ModelFiles, tokenizer: Tokenizer | None) -> frozenset[int]:
    """The tokenizer's EOS ids; without a tokenizer, those of the model's config.json."""
    if tokenizer is not None:
        return tokenizer.eos_token_ids
    eos = files.config.get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _tokenizer_dir(option: str, progress: bool) -> Path:
    path = Path(option).expanduser()
    if not path.is_dir():
        try:
            path = resolve_model(option, progress=progress).path
        except ValueError as e:
            raise ValueError(f"tokenizer {option!r}: {e}") from None
    if not Tokenizer.present_in(path):
        raise ValueError(f"tokenizer {option!r}: {path} has no tokenizer.json or tokenizer_config.json")
    return path
