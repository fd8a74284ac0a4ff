"""Which worker a request runs on, when the scheduler drives several (data parallel).

Policy "prefix" (the default): a request goes to the worker that holds the longest prefix of its prompt, if that
covers at least half of the prompt and the worker is not overloaded; otherwise to the least loaded worker. What a
worker holds is known exactly, not guessed: the scheduler keeps each worker's block manager, whose prefix cache is
keyed by the chained block hashes used here (block_manager.full_block_hashes). Requests placed but not admitted
yet have no blocks, so the prompts placed recently count too (an LRU of block hash -> worker): the 16 requests of
one system prompt that arrive together all go where the first went, instead of each computing the prefix on
whichever worker is idlest.

"Overloaded" is SGLang's cache-aware router's rule: more than OVERLOAD_SLACK sequences beyond the least loaded
worker. Load is the sequences a worker's scheduler holds (running and waiting): what a new one queues behind.

Policy "round-robin" ignores the cache (vLLM's data-parallel placement); it is here to measure against.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.block_manager import full_block_hashes
from engine.scheduler import Scheduler

POLICIES = ("prefix", "round-robin")
MIN_PREFIX_SHARE = 0.5       # of the prompt's tokens, for affinity to count (a shared chat template header does not)
OVERLOAD_SLACK = 32          # sequences a worker may hold beyond the least loaded one and still get its prefixes
RECENT_BLOCKS = 1 << 18      # block hashes of recently placed prompts remembered (LRU)


@dataclass(frozen=True)
class Choice:
    worker: str
    reason: str              # "prefix", "load" or "round_robin"


def load_of(scheduler: Scheduler) -> int:
    return len(scheduler.running) + len(scheduler.waiting)


class Placement:
    def __init__(self, policy: str = "prefix"):
        if policy not in POLICIES:
            raise ValueError(f"placement policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.recent: OrderedDict[int, str] = OrderedDict()      # block hash -> the worker last sent it
        self._turn = 0

    def choose(self, prompt_token_ids: list[int], schedulers: dict[str, Scheduler]) -> Choice:
        """A worker among `schedulers` (name -> that worker's scheduler; at least one) for this prompt."""
        names = sorted(schedulers)
        if self.policy == "round-robin":
            self._turn += 1
            return Choice(names[(self._turn - 1) % len(names)], "round_robin")
        block_size = next(iter(schedulers.values())).block_manager.block_size
        hashes = list(full_block_hashes(prompt_token_ids, block_size))
        loads = {name: load_of(schedulers[name]) for name in names}
        least = min(names, key=lambda n: (loads[n], n))
        matched = {name: self._matched_blocks(hashes, name, schedulers[name]) for name in names}
        best = max(names, key=lambda n: (matched[n], -loads[n]))
        if matched[best] * block_size >= MIN_PREFIX_SHARE * len(prompt_token_ids) and \
                loads[best] <= loads[least] + OVERLOAD_SLACK:
            choice = Choice(best, "prefix")
        else:
            choice = Choice(least, "load")
        for h in hashes:
            self.recent[h] = choice.worker
            self.recent.move_to_end(h)
        while len(self.recent) > RECENT_BLOCKS:
            self.recent.popitem(last=False)
        return choice

    def forget(self, worker: str) -> None:
        """A worker is gone: nothing it cached is there any more."""
        self.recent = OrderedDict((h, w) for h, w in self.recent.items() if w != worker)

    def _matched_blocks(self, hashes: list[int], worker: str, scheduler: Scheduler) -> int:
        cached = scheduler.block_manager.cached if scheduler.block_manager.enable_prefix_caching else {}
        n = 0
        for h in hashes:
            if h not in cached and self.recent.get(h) != worker:
                break
            n += 1
        return n

