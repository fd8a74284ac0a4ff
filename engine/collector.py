"""Python's cyclic garbage collector kept off the model loop's path.

The collector runs in whichever thread allocates past its threshold, and a full pass walks every tracked object.
With an engine loaded (the model's modules, the tokenizer, the requests' state) that is about 615,000 objects for
the Llama-3.2-1B shape, and one full pass took 340-400 ms on the H200 machine's host (timed with gc.callbacks,
2026-12-01): in a server, a model loop stopped that long every so often, with the GPU idle and every stream
stalled behind it. What is alive when a loop starts lives about as long as the loop: frozen, it is never scanned
again; what the loop makes is collected as before (young passes: milliseconds in all over a run). vLLM and SGLang
freeze their heap after start-up for the same reason.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def frozen_heap():
    """Objects alive now are left out of the collector's passes until the block ends (gc.freeze: O(1), no pass)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
