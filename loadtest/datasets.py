"""Where the benchmark's requests come from: (prompt text, prompt tokens, output tokens) per request.

  random    prompts of random token ids of the model's vocabulary, decoded to text; lengths drawn uniformly in
            [L * (1 - r), L * (1 + r)] for --random-input-len / --random-output-len L and --random-range-ratio r
  prefix    requests in groups that share a prompt prefix, as requests sharing a system prompt do: --prefix-count
            random prefixes of --prefix-len tokens, each request one of them then a random question of
            --suffix-len tokens (what a prefix cache and a cache-aware placement of requests are measured on)
  workload  the project's fixed workloads (loadtest/workloads/*.json, read by loadtest.throughput), drawn as
            the offline bench draws them, the token ids then decoded to text
  sharegpt  a ShareGPT-format JSON file: each conversation's first human turn is the prompt, and the length
            of the reply that followed it is the output length (unless --output-len fixes one)
  jsonl     one JSON object per line: {"prompt": "...", "output_len": 128} ("max_tokens" works too; without
            either, --output-len)

Token counts come from the model's tokenizer, never from splitting on spaces. Prompts are sent as text, which
every OpenAI-compatible server takes, so the server tokenizes them again: a random prompt is re-encoded until its
length is what was drawn (decode/encode does not round-trip for arbitrary ids), and the server's own count (its
usage) is reported beside it.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int          # tokens, by the model's tokenizer
    output_len: int          # max_tokens to ask for


# ---- the tokenizer ---------------------------------------------------------------------------------------------
def load_tokenizer(name: str):
    """A Hugging Face tokenizer from local files only (nothing is fetched): a model directory, a pagestream model
    name (the alias smollm2-135m-instruct or a .gguf file, through engine.model_files), or a hub id already in
    the local Hugging Face cache."""
    from transformers import AutoTokenizer
    path = Path(name).expanduser()
    if not path.is_dir():
        try:
            from engine.model_files import ALIASES, resolve_model
            if name in ALIASES or path.suffix == ".gguf":
                path = resolve_model(name, progress=False).path
        except ImportError:                               # the harness alone, without the engine's dependencies
            pass
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True)
    except Exception as e:
        raise ValueError(f"no tokenizer for {name!r} on this machine ({type(e).__name__}: {e}); pass --tokenizer "
                         f"with a local model directory") from None


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i in getattr(tokenizer, "added_tokens_decoder", {})}


def text_of_length(tokenizer, ids: list[int], length: int, rng: random.Random, pool: list[int]) -> tuple[str, int]:
    """Text that the tokenizer encodes to `length` tokens (or as close as a few tries get), from these ids."""
    text = tokenizer.decode(ids[:length])
    for _ in range(10):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == length:
            break
        if len(encoded) > length:
            encoded = encoded[:length]
        else:
            encoded += [rng.choice(pool) for _ in range(length - len(encoded))]
        text = tokenizer.decode(encoded)
    return text, count_tokens(tokenizer, text)


# ---- the datasets ----------------------------------------------------------------------------------------------
def random_requests(tokenizer, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[SampleRequest]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    special = _special_ids(tokenizer)
    pool = [i for i in range(len(tokenizer)) if i not in special]

    def draw(length: int) -> int:
        return rng.randint(max(1, int(length * (1 - range_ratio))), max(1, int(length * (1 + range_ratio))))

    requests = []
    for _ in range(num):
        il, ol = draw(input_len), draw(output_len)
        ids = [rng.choice(pool) for _ in range(il)]
        text, n = text_of_length(tokenizer, ids, il, rng, pool)
        requests.append(SampleRequest(text, n, ol))
    return requests


def prefix_sharing_requests(tokenizer, num_prefixes: int = 32, prefix_len: int = 1000, num: int = 512,
                            suffix_len: int = 100, output_len: int = 128, seed: int = 0) -> list[SampleRequest]:
    """num requests, each one of num_prefixes random "system prompts" of prefix_len tokens, a newline, then a
    random question of suffix_len tokens. The prefixes are spread evenly (group sizes differ by one at most), in
    an order shuffled with the seed. A prefix never ends in whitespace, so the byte-level pre-tokenizer splits
    at the newline and a prompt's first prefix_len tokens are its prefix's own, which is what the prefix cache
    sees; each prompt is checked for it (a question is drawn again in the rare case it is not)."""
    if min(num_prefixes, prefix_len, suffix_len, output_len) < 1:
        raise ValueError("the prefix count and the prefix, suffix and output lengths must be positive")
    rng = random.Random(seed)
    special = _special_ids(tokenizer)
    pool = [i for i in range(len(tokenizer)) if i not in special]

    def draw_prefix() -> tuple[str, list[int]]:
        for _ in range(100):
            text, n = text_of_length(tokenizer, [rng.choice(pool) for _ in range(prefix_len)], prefix_len, rng, pool)
            if n == prefix_len and not text[-1].isspace():
                return text, tokenizer.encode(text, add_special_tokens=False)
        raise ValueError(f"no text of exactly {prefix_len} tokens that ends in a non-space was drawn")

    prefixes = [draw_prefix() for _ in range(num_prefixes)]
    groups = [i % num_prefixes for i in range(num)]
    rng.shuffle(groups)
    requests = []
    for group in groups:
        prefix, prefix_ids = prefixes[group]
        for _ in range(100):
            question, _ = text_of_length(tokenizer, [rng.choice(pool) for _ in range(suffix_len)], suffix_len,
                                         rng, pool)
            prompt = f"{prefix}\n{question}"
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            if ids[:prefix_len] == prefix_ids:
                break
        else:
            raise ValueError("no question kept its prefix's tokens whole")
        requests.append(SampleRequest(prompt, len(ids), output_len))
    return requests


def workload_requests(tokenizer, workload: str, num: int | None, scale: float = 1.0) -> list[SampleRequest]:
    """The fixed workload's draws (loadtest.throughput's loader and generator, so both benches see the same
    requests), with token ids taken within the tokenizer's vocabulary and decoded to text."""
    from loadtest.throughput import draw_requests, load_workload
    spec = load_workload(workload)
    rng = random.Random(spec["seed"])
    special = _special_ids(tokenizer)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    requests = []
    for ids, output_len in draw_requests(spec, len(tokenizer), num, scale):
        ids = [i if i not in special else pool[i % len(pool)] for i in ids]
        text, n = text_of_length(tokenizer, ids, len(ids), rng, pool)
        requests.append(SampleRequest(text, n, output_len))
    return requests


def sharegpt_requests(path: str | Path, tokenizer, num: int, seed: int = 0, output_len: int | None = None,
                      max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[SampleRequest]:
    """Conversations in random order (seeded); those too short to measure (under 4 tokens either side) or too
    long for a 2k-context model are skipped, as vLLM's benchmark does."""
    data = json.loads(Path(path).read_text())
    pairs = []
    for conversation in data:
        turns = conversation.get("conversations") or conversation.get("conversation") or []
        human = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
        if human is None or human + 1 >= len(turns):
            continue
        pairs.append((turns[human]["value"], turns[human + 1]["value"]))
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        if len(requests) == num:
            break
        prompt_len = count_tokens(tokenizer, prompt)
        ol = output_len if output_len is not None else count_tokens(tokenizer, reply)
        if output_len is None and (prompt_len < 4 or ol < 4):
            continue
        if prompt_len > max_prompt_len or prompt_len + ol > max_total_len:
            continue
        requests.append(SampleRequest(prompt, prompt_len, ol))
    if not requests:
        raise ValueError(f"{path}: no usable conversation (a human turn followed by a reply, within the lengths)")
    return requests


def jsonl_requests(path: str | Path, tokenizer, num: int, output_len: int | None = None) -> list[SampleRequest]:
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\"") from None
        ol = item.get("output_len", item.get("max_tokens", output_len))
        if ol is None:
            raise ValueError(f"{path}:{number}: no output_len or max_tokens; give --output-len")
        requests.append(SampleRequest(prompt, count_tokens(tokenizer, prompt) if tokenizer is not None else 0,
                                      int(ol)))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests


def cycle_to(requests: list[SampleRequest], num: int) -> list[SampleRequest]:
    """A file with fewer prompts than asked for is repeated in order to make up the number."""
    return [requests[i % len(requests)] for i in range(num)]
