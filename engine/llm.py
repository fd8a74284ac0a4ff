"""The offline API, like vLLM's: `LLM(model, **options).generate(prompts, params)` runs whole batches."""
from __future__ import annotations

import itertools

from tqdm import tqdm

from engine.collector import frozen_heap
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.input_processor import Conversation
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import BeamSearchOutput, RequestOutput
from schemas.beam_search_params import BeamSearchParams
from schemas.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, progress: bool = True, **options):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **options), progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel followers, if any (they stop with this process too)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: list[int] | None = None) -> list[RequestOutput]:
        """Prompts are strings, token-id lists or conversations; outputs come back in the same order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        return self._run(self._add(prompts, params, priority), use_tqdm)

    def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search: per prompt, its beam_width beams best first (tokens, text, cumulative logprob).
        The beams share their prefix's KV blocks; each output says how many blocks that saved at most."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        ids = self._add(prompts, [params.sampling_params()] * len(prompts), None, params)
        return [BeamSearchOutput.of(out) for out in self._run(ids, use_tqdm)]

    def _add(self, prompts: list[Prompt], params: list[SamplingParams], priority: list[int] | None,
             beam_search: BeamSearchParams | None = None) -> list[str]:
        """Queue every prompt, or none (an invalid one raises, and those queued before it are aborted)."""
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        self.engine.add_requests(ids, prompts, params, priority, beam_search)
        return ids

    def chat(self, conversations: Conversation | list[Conversation],
             params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Conversations (lists of {"role", "content"} messages) through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate(conversations, params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        with frozen_heap():
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(stream=False):
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        bar.close()
        return [done[i] for i in ids]
