"""The streaming engine: add a request, async-iterate its outputs, abort it.

The engine loop runs in its own thread (a forward pass blocks), taking commands from a queue and handing outputs
to each request's asyncio queue on the caller's event loop. A consumer that stops iterating (a client went away)
aborts its request, which frees its KV blocks before the next step.

    async for out in engine.generate(prompt, params): ...         # RequestOutputs as tokens come
    outputs = await engine.beam_search(prompts, beam_params)        # LLM.beam_search's answer, beside other requests
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator

from engine.collector import frozen_heap
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import BeamSearchOutput, RequestOutput
from schemas.beam_search_params import BeamSearchParams
from schemas.sampling_params import SamplingParams

_STOP = object()


class AsyncLLM:
    def __init__(self, model: str = DEFAULT_MODEL, progress: bool = True, **options):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **options), progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       priority: int = 0, beam_search: BeamSearchParams | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput whenever the request has new tokens; the last one has finished=True.
        beam_search: a beam search (as LLMEngine.add_request's), whose one output comes when it ends.
        Raises ValueError at once for an invalid request."""
        if self._error is not None:
            raise RuntimeError("the engine loop has failed") from self._error
        request_id = request_id or f"async-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        added: Future = Future()
        self._commands.put((self.engine.add_request, (request_id, prompt, params, priority, beam_search), added))
        try:
            await asyncio.wrap_future(added)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """LLM.beam_search, served beside the engine's other requests: per prompt, its beams best first. The
        prompts are searched at once; if one is invalid, ValueError, and the others are aborted."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]

        async def search(prompt: Prompt) -> BeamSearchOutput:
            async for out in self.generate(prompt, beam_search=params):
                if out.finished:
                    return BeamSearchOutput.of(out)
            raise RuntimeError("the beam search ended without a finished output")

        searches = [asyncio.ensure_future(search(p)) for p in prompts]
        try:
            return list(await asyncio.gather(*searches))
        except BaseException:
            # gather leaves the other searches running: cancelled, each aborts its request as it leaves.
            for s in searches:
                s.cancel()
            await asyncio.gather(*searches, return_exceptions=True)
            raise

    def abort(self, request_id: str) -> None:
        self._commands.put((self.engine.abort_request, (request_id,), None))

    def shutdown(self) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.engine.close()

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with frozen_heap():
                self._serve()
        except BaseException as e:               # the engine broke: fail every open stream, don't hang them
            self._error = e
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"engine failed: {e!r}"))
            raise

    def _serve(self) -> None:
        """Until shutdown: take the commands that arrived (blocking only when idle), then step."""
        while True:
            idle = not self.engine.has_unfinished_requests()
            # Block only when idle; otherwise take whatever arrived and step.
            commands = [self._commands.get()] if idle else []
            while not self._commands.empty():
                commands.append(self._commands.get_nowait())
            for command in commands:
                if command is _STOP:
                    return
                fn, args, done = command
                try:
                    fn(*args)
                    if done is not None:
                        done.set_result(None)
                except Exception as e:      # an invalid request: the caller gets the error
                    if done is None:
                        raise
                    done.set_exception(e)
            if self.engine.has_unfinished_requests():
                # A request that arrives during a plan of k steps ends it at the next step boundary.
                self.engine.step(on_output=lambda out: self._deliver(out.request_id, out),
                                 should_stop=lambda: not self._commands.empty())

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
