"""The one input path: a request's prompt (text, token ids, or a chat conversation) becomes validated prompt token
ids, and an unseeded request gets its sampling seed.

LLMEngine.add_request (so LLM, AsyncLLM and the CLI) and the tokenizer service both go through here, so a prompt
is accepted or refused the same way, with the same message, whichever way it came in. The scheduler service runs
the token-id checks once more on what reaches it (a stray message must get an error reply, not break a plan) and
picks the seeds there, where one leader draws them in arrival order. The engine's Scheduler trusts its input and
checks only what it alone knows: the KV pool, max_num_seqs, request ids in use.

Requests that come together (LLM.generate's list, what a tokenizer service reads at once) go through
process_batch: process() is process_batch of one, so both give the same ids and the same errors, and the batch
hands all its texts to the fast tokenizer in one call (Rust, in parallel, without the GIL), which is most of a
text prompt's cost.

A structured-output constraint (a JSON schema, regex, choice or grammar) is checked by compiling it, where the
processor has the grammars (engine/structured_output.py: the tokenizer service's, LLMEngine's): xgrammar's
message is the client's. Compiled grammars are cached by spec, so this costs a request nothing when its spec
was seen before. The scheduler service's processor has none and leaves that check to the tokenizer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jinja2

from schemas.sampling_params import SamplingParams

if TYPE_CHECKING:              # the scheduler service validates token ids without loading transformers
    from engine.structured_output import Grammars
    from engine.tokenizer import Tokenizer

Conversation = list[dict]          # [{"role": ..., "content": ...}, ...]


@dataclass
class PromptInput:
    """One request's prompt, as process() takes it."""
    params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: Conversation | None = None
    add_generation_prompt: bool = True
    tools: list[dict] | None = None


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int, vocab_size: int, seed: int = 0,
                 grammars: Grammars | None = None):
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._rng = random.Random(seed)

    def process(self, params: SamplingParams, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                messages: Conversation | None = None, add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
        """The prompt token ids of a request given as messages (through the chat template), else as token ids,
        else as text; tools (OpenAI's function definitions) go to the chat template. Raises ValueError, with a
        message fit for the client, if the request cannot be served. Fills in params.bad_words_token_ids (the
        tokenizer is here)."""
        return _value(self.process_batch([PromptInput(params, prompt, prompt_token_ids, messages,
                                                      add_generation_prompt, tools)])[0])

    def process_batch(self, inputs: list[PromptInput]) -> list[list[int] | ValueError]:
        """process() for many requests at once: each one's prompt token ids, or the ValueError process() would
        raise for it. The text prompts (and rendered conversations) go to the tokenizer in one call, which the
        fast tokenizer encodes in parallel in Rust, without the GIL: per prompt, that is most of the work."""
        results = self._tokenize_batch(inputs)
        for i, (request, ids) in enumerate(zip(inputs, results)):
            if not isinstance(ids, ValueError):
                try:
                    self._validate(request.params, ids)
                except ValueError as e:
                    results[i] = e
        return results

    def _validate(self, params: SamplingParams, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        # Tokenized prompts too: a tokenizer larger than the model's vocabulary must not reach the embedding.
        # The test in C first (a prompt is hundreds of ids); the list of offenders only for the message.
        if not (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < self.vocab_size):
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]}")
        # max_tokens None: as many as fit, and at least one must.
        completion = params.max_tokens if params.max_tokens is not None else 1
        if len(ids) + completion > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {len(ids) + completion} tokens ({len(ids)} in the prompt, {completion} "
                             f"for the completion). Please reduce the prompt or max_tokens.")
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        for name, used in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ()),
                           ("allowed_token_ids", params.allowed_token_ids or ()),
                           ("bad_words", [t for w in params.bad_words_token_ids or () for t in w])):
            bad = [t for t in used if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name}: token ids must be in [0, {self.vocab_size}) (the model's vocabulary), "
                                 f"got {bad[:5]}")
        if params.structured_outputs is not None and self.grammars is not None:
            self.grammars.compile(params.structured_outputs)

    def tokenize(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 messages: Conversation | None = None, add_special_tokens: bool | None = None,
                 add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """The prompt's token ids, as a request would have them (process() and the /tokenize endpoint).
        add_special_tokens None: as for a request (text: the tokenizer's BOS and the like; a rendered chat
        template already holds its own)."""
        request = PromptInput(SamplingParams(), prompt, prompt_token_ids, messages, add_generation_prompt, tools)
        return _value(self._tokenize_batch([request], add_special_tokens)[0])

    def _tokenize_batch(self, inputs: list[PromptInput],
                        add_special_tokens: bool | None = None) -> list[list[int] | ValueError]:
        """Messages win over token ids, token ids over text. Texts are gathered, by whether the tokenizer adds
        its special tokens to them, and encoded together."""
        results: list = [None] * len(inputs)
        texts: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
        for i, request in enumerate(inputs):
            try:
                if request.messages is not None:
                    text = self._render_chat(request.messages, request.add_generation_prompt, request.tools)
                    texts[bool(add_special_tokens)].append((i, text))
                elif request.prompt_token_ids is not None:
                    results[i] = list(request.prompt_token_ids)
                elif request.prompt is not None:
                    self._require_tokenizer()
                    texts[add_special_tokens is not False].append((i, request.prompt))
                else:
                    raise ValueError("a prompt or messages is required")
            except ValueError as e:
                results[i] = e
        for special, items in texts.items():
            if items:
                for (i, _), ids in zip(items, self._encode_texts([text for _, text in items], special)):
                    results[i] = ids
        return results

    def _encode_texts(self, texts: list[str], add_special_tokens: bool) -> list[list[int] | ValueError]:
        try:
            return self.tokenizer.encode_batch(texts, add_special_tokens)
        except (TypeError, ValueError):
            pass          # a text the tokenizer refuses (a lone surrogate: not Unicode text) fails alone
        results = []
        for text in texts:
            try:
                results.append(self.tokenizer.encode(text, add_special_tokens))
            except (TypeError, ValueError) as e:
                results.append(ValueError(f"the prompt cannot be tokenized: {e}"))
        return results

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as the tokens it is generated as: on its own, and after a space (as vLLM does; a word
        usually follows one)."""
        tokenizer = self._require_tokenizer()
        sequences: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    def seed(self, params: SamplingParams) -> int:
        """The request's sampling seed: its own, else the next draw of this processor's generator (so unseeded
        requests are reproducible from the engine's seed and their order of arrival)."""
        return params.seed if params.seed is not None else self._rng.getrandbits(63)

    def _render_chat(self, messages: Conversation, add_generation_prompt: bool,
                     tools: list[dict] | None = None) -> str:
        if not messages:
            raise ValueError("messages must not be empty")
        try:
            return self._require_tokenizer().render_chat(messages, add_generation_prompt, tools)
        except jinja2.TemplateError as e:           # e.g. a template that insists on alternating roles
            raise ValueError(f"the conversation does not fit the model's chat template: {e}") from None

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model runs without a tokenizer (dummy weights without --tokenizer, or "
                             "--tokenizer none): send the prompt as token ids")
        return self.tokenizer


def _value(result: list[int] | ValueError) -> list[int]:
    if isinstance(result, ValueError):
        raise result
    return result
