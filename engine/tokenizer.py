"""The model's tokenizer: text to ids, chat conversations through the model's template, EOS ids.

Loaded from the model directory with transformers (local files only). The fast Rust tokenizer underneath
(`backend`) is what the detokenizer streams through.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
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

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use a completion prompt")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The rendered template already holds its special tokens (BOS included where the model wants one).
        text = self.render_chat(messages, add_generation_prompt)
        return self.hf.encode(text, add_special_tokens=False)
