"""A tensor-parallel follower process: python -m engine.tensor_parallel_follower RANK SIZE RENDEZVOUS, started by
the driver's ModelRunner (engine/tensor_parallel.py, start_followers), which writes the engine and model configs
as one JSON line on its stdin and keeps that pipe open while it lives."""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from engine.config import EngineConfig
from engine.model_runner import ModelRunner


def main(rank: int, size: int, rendezvous: str) -> None:
    message = json.loads(sys.stdin.readline())

    def exit_with_the_driver():          # the driver holds our stdin: EOF means it is gone
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=exit_with_the_driver, daemon=True).start()
    config = EngineConfig.from_kwargs(**message["config"])
    model_dir = None if message["model_dir"] is None else Path(message["model_dir"])
    runner = ModelRunner(config, message["hf_config"], model_dir, progress=False, follower=(rank, rendezvous))
    runner.follow()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
