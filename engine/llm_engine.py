"""The engine core in one process: input and output processors, scheduler, model runner, one step at a time.

    ids = input_processor.process()  # add_request(s): chat template, tokenize, validate
    plan = scheduler.schedule()      # which sequences compute how many tokens
    result = runner.execute(plan)    # forward + sample
    scheduler.update(result)         # append tokens, finish on EOS / stop ids / length
    output processor, per token      # detokenize, cut at stop strings: one finishes the sequence in the scheduler

LLM (offline batches) and AsyncLLM (streaming) drive this; the services split the same objects across processes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from engine.beam_search import BeamSearchResult
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.input_processor import Conversation, InputProcessor, PromptInput
from engine.model_files import resolve_model
from engine.model_runner import ModelRunner
from engine.output_processor import CompletionState, OutputProcessor
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.scheduler import Scheduler, SchedulerStats
from engine.sequence import FinishReason, Sequence
from engine.structured_output import Grammars
from engine.tokenizer import eos_token_ids, load_tokenizer
from schemas.beam_search_params import BeamSearchParams
from schemas.sampling_params import SamplingParams

Prompt = str | list[int] | Conversation          # text, token ids, or messages for the chat template


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None
    kv_blocks_saved: int = 0
    completions: dict[int, CompletionOutput] = field(default_factory=dict)
    states: dict[int, CompletionState] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        mc = config.model
        files = resolve_model(mc.model, mc.load_format, progress=progress)
        self.model_name = files.name
        self.tokenizer = load_tokenizer(files, mc.tokenizer, progress)
        eos = eos_token_ids(files, self.tokenizer)
        # load_tokenizer has sized a dummy model's vocabulary to its tokenizer: config.json's is the model's.
        grammars = Grammars(self.tokenizer, files.config["vocab_size"], eos)     # one cache for both ends
        self.runner = ModelRunner(config, files.config, files.path, eos, progress, grammars)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.args.vocab_size
        block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                     config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, block_manager, self.max_model_len, eos)
        self.input_processor = InputProcessor(self.tokenizer, self.max_model_len, self.vocab_size, mc.seed, grammars)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.requests: dict[str, _Request] = {}
        self._touched: dict[str, _Request] = {}       # requests that got tokens since the last step()
        self._on_output: Callable[[RequestOutput], None] | None = None

    def close(self) -> None:
        self.runner.close()

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0, beam_search: BeamSearchParams | None = None) -> None:
        """Queue a request (a beam search with beam_search, whose params are beam_search.sampling_params()).
        Raises ValueError, queuing nothing, if it is invalid."""
        self.add_requests([request_id], [prompt], [params], [priority], beam_search)

    def add_requests(self, request_ids: list[str], prompts: list[Prompt], params: list[SamplingParams | None],
                     priorities: list[int] | None = None, beam_search: BeamSearchParams | None = None) -> None:
        """Queue every request, or none: the first invalid one (in order) raises what add_request would have,
        and those queued before it are taken back. The prompts go through the input processor together (one
        tokenizer call for all the texts). Their arrival is now: their time to first token includes this."""
        arrival = time.monotonic()
        params = [p or (beam_search.sampling_params() if beam_search is not None else SamplingParams())
                  for p in params]
        inputs = [PromptInput(p, prompt=prompt) if isinstance(prompt, str) else
                  PromptInput(p, messages=prompt) if prompt and isinstance(prompt[0], dict) else
                  PromptInput(p, prompt_token_ids=prompt) for prompt, p in zip(prompts, params)]
        processed = self.input_processor.process_batch(inputs)
        added = []
        try:
            for i, (request_id, prompt, p, ids) in enumerate(zip(request_ids, prompts, params, processed)):
                if isinstance(ids, ValueError):
                    raise ids
                self.scheduler.add_request(request_id, ids, p, self.input_processor.seed(p),
                                           priorities[i] if priorities else 0, beam_search)
                added.append(request_id)
                self.requests[request_id] = _Request(request_id, prompt if isinstance(prompt, str) else None, ids,
                                                     p, RequestMetrics(arrival_time=arrival))
        except Exception:
            for request_id in added:
                self.abort_request(request_id)
            raise

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        self.requests.pop(request_id, None)
        self._touched.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self, stream: bool = True, on_output: Callable[[RequestOutput], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """One plan. Returns an output for every request that got tokens since the last step (stream=False:
        only for those that finished, which is all an offline batch needs, and spares copying every request's
        tokens each step). With asynchronous output a plan's last step reaches the host during the next
        plan, so its tokens come with the next step's outputs. on_output: instead of returning them, hand
        the outputs over as each step's tokens arrive (a plan of k steps streams token by token).
        should_stop: asked between the plan's steps; True ends the plan at that step boundary (AsyncLLM: a new
        request arrived, and is admitted by the next plan instead of waiting for this one to end)."""
        self._on_output = on_output
        plan = self.scheduler.schedule()
        try:
            self.runner.execute(plan, self._on_step, should_stop=should_stop)
        finally:
            self._on_output = None
        self.scheduler.cut(plan, self.runner.steps_run)
        return self._take_outputs(stream)

    def _take_outputs(self, stream: bool) -> list[RequestOutput]:
        outputs = []
        for request in self._touched.values():
            finished = request.request_id not in self.scheduler.requests
            if finished:
                self.requests.pop(request.request_id, None)
            # best_of > n: which n are returned is known only at the end (as OpenAI: such results don't stream)
            if finished or (stream and not request.params.ranks_by_logprob):
                outputs.append(self._output(request, finished))
        self._touched.clear()
        return outputs

    def _on_step(self, result) -> None:
        """Called as each step's tokens reach the host: with asynchronous output this bookkeeping runs while
        the GPU computes the next step."""
        now = time.monotonic()
        sampled_logprobs = dict(zip(result.seq_ids, result.logprobs)) if result.logprobs else {}
        for seq in self.scheduler.update(result):
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            self._append(request, seq, seq.token_ids[-1], sampled_logprobs.get(seq.seq_id))
            prompt_logprobs = result.prompt_logprobs.get(seq.seq_id)
            if prompt_logprobs is not None and request.prompt_logprobs is None:
                request.prompt_logprobs = [None, *prompt_logprobs]
            if seq.index == 0:
                request.metrics.token_times.append(now)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
                request.num_cached_tokens = seq.num_cached_tokens
            if request.request_id not in self.scheduler.requests:
                request.metrics.finished_time = now
            self._touched[request.request_id] = request
        for search in self.scheduler.take_finished_beam_searches():
            self._finish_beam_search(search, now)
        if self._on_output is not None:
            for output in self._take_outputs(stream=True):
                self._on_output(output)

    def _finish_beam_search(self, search: BeamSearchResult, now: float) -> None:
        """A beam search's best params.n beams become its completions, each beam's tokens through the output
        processor as any completion's."""
        request = self.requests.get(search.request_id)
        if request is None:
            return
        for index, beam in enumerate(search.beams[:request.params.n]):
            state = self.output_processor.new_completion(request.prompt_token_ids, request.params)
            out = request.completions[index] = CompletionOutput(index=index, cumulative_logprob=beam.cum_logprob)
            tokens = beam.output_token_ids
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                step = state.add_token(token, beam.finish_reason.value if last else None,
                                       beam.stop_reason if last else None)
                out.text += step.text
                out.finish_reason, out.stop_reason = step.finish_reason, step.stop_reason
            out.token_ids, out.delta_token_ids, out.delta_text = list(tokens), list(tokens), out.text
        request.kv_blocks_saved = search.kv_blocks_saved
        request.metrics.first_token_time = request.metrics.first_token_time or now
        request.metrics.finished_time = now
        self._touched[request.request_id] = request

    def _append(self, request: _Request, seq: Sequence, token: int, logprobs) -> None:
        out = request.completions.get(seq.index)
        if out is None:
            params = request.params
            out = request.completions[seq.index] = CompletionOutput(
                index=seq.index, logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None or params.ranks_by_logprob else None)
            # Its text is decoded when an output is made (_output): every step when streaming, else at the end.
            request.states[seq.index] = self.output_processor.new_completion(request.prompt_token_ids,
                                                                             request.params, defer_text=True)
        finish = seq.finish_reason.value if seq.is_finished else None
        step = request.states[seq.index].add_token(token, finish, seq.stop_reason)
        if step.stop_upstream:
            self.scheduler.finish(seq, FinishReason.STOP, stop_reason=step.stop_reason)
        out.token_ids.append(token)
        out.delta_token_ids.append(token)
        if out.logprobs is not None and logprobs is not None:
            out.logprobs.append(logprobs)
        if out.cumulative_logprob is not None and logprobs is not None:
            out.cumulative_logprob += logprobs.logprob
        out.text += step.text
        out.delta_text += step.text
        out.finish_reason, out.stop_reason = step.finish_reason, step.stop_reason

    def _output(self, request: _Request, finished: bool) -> RequestOutput:
        completions = [request.completions[i] for i in sorted(request.completions)]
        for c in completions:
            state = request.states.get(c.index)
            if state is not None:
                text = state.pending_text()
                c.text += text
                c.delta_text += text
        snapshot = [CompletionOutput(c.index, c.text, list(c.token_ids),
                                     list(c.logprobs) if c.logprobs is not None else None, c.cumulative_logprob,
                                     c.finish_reason, c.stop_reason, c.delta_text, c.delta_token_ids)
                    for c in completions]
        for c in completions:               # deltas are per output
            c.delta_text, c.delta_token_ids = "", []
        if finished and request.params.ranks_by_logprob:
            snapshot = best_of(snapshot, request.params.n)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, snapshot, finished,
                             request.num_cached_tokens, request.metrics, prompt_logprobs=request.prompt_logprobs,
                             kv_blocks_saved=request.kv_blocks_saved)


def best_of(completions: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n completions of highest cumulative logprob, best first, numbered 0..n-1 (as vLLM V0 chose them)."""
    best = sorted(completions, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
    for index, c in enumerate(best):
        c.index = index
    return best
