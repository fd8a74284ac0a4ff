"""The `pagestream` command.

    pagestream generate [--model M] "prompt" ...   answer prompts (through the chat template if the model has one)
    pagestream generate --raw "text"               complete the text as is
    pagestream generate --chat                     an interactive chat in the terminal
    pagestream serve [--model M] [--host 127.0.0.1] [--port 8000] [--grpc-port P] [--tokenizers N] ...
                                                   the whole pipeline (gRPC only with --grpc-port)
    pagestream service NAME [...]                  one service: gateway, tokenizer, scheduler, worker, detokenizer
    pagestream bench throughput [--workload w256] ...         offline throughput (see loadtest/throughput.py)
    pagestream bench serve --base-url URL [--request-rate R] ...   load a running server (see loadtest/serve.py)
    pagestream bench pipeline [--workload w256] ...           offline and served, one table (loadtest/pipeline.py)

Every engine option (ModelConfig, CacheConfig, SchedulerConfig fields) is a flag: --max-num-seqs, --block-size...
"""
from __future__ import annotations

import argparse
import os
import sys

from engine.config import SchedulerConfig, add_engine_args, engine_kwargs
from services.placement import POLICIES

def engine_config(args: argparse.Namespace):
    from engine.config import EngineConfig
    return EngineConfig.from_kwargs(**engine_kwargs(args))


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    return engine_config(args).scheduler


SERVICES = ("gateway", "tokenizer", "scheduler", "worker", "detokenizer")


def add_stack_args(parser: argparse.ArgumentParser) -> None:
    """What every service of the pipeline shares, then each service's own flags."""
    group = parser.add_argument_group("pipeline")
    group.add_argument("--redis-url", default=os.environ.get("PAGESTREAM_REDIS_URL"),
                       help="an existing Redis, or a Redis Cluster: redis+cluster://[:password@]host:port"
                            "[,host:port...] (default: $PAGESTREAM_REDIS_URL; serve without it starts its own)")
    group.add_argument("--prefix", default="ps", help="namespace of this deployment's streams and keys")
    group.add_argument("--worker-name", default="w0", help="this worker's name (the worker service), unique in the "
                       "deployment; auto: one from the host name and pid (for replicas of one container)")
    group.add_argument("--placement", choices=POLICIES, default="prefix",
                       help="which worker a request runs on, with several (the scheduler): prefix = the one whose "
                            "KV cache holds the prompt's prefix unless it is overloaded, else the least loaded; "
                            "round-robin ignores the cache")
    group.add_argument("--partitions", type=int, default=8, help="detokenizer partitions (worker and "
                                                                  "detokenizers must agree)")
    group.add_argument("--resume-grace", type=float, default=30.0,
                       help="seconds a dead gateway's streams stay resumable (a client reconnecting with "
                            "Last-Event-ID continues where it broke) before they are aborted")
    add_engine_args(parser)
    from services.gateway import add_arguments as add_gateway_args     # the only service with flags of its own
    add_gateway_args(parser)


def service_module(name: str):
    import importlib
    return importlib.import_module(f"services.{name}")


def cmd_serve(args: argparse.Namespace) -> int:
    from services.launcher import serve
    return serve(args.parser, args)


def cmd_service(args: argparse.Namespace) -> int:
    if args.redis_url is None:
        raise SystemExit("a single service needs --redis-url or $PAGESTREAM_REDIS_URL (pagestream serve starts "
                         "its own Redis)")
    return service_module(args.service).run(args)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                       "holding this much probability (1: off)")
    group.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min_p times the "
                       "likeliest (0: off)")
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (--seed seeds the engine)")
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from schemas.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine, Prompt

    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    params = sampling_params(args)

    def stream(prompt: Prompt) -> str:
        engine.add_request("cli", prompt, params)
        text = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                delta = out.outputs[0].delta_text
                text += delta
                print(delta, end="", flush=True)
        print()
        return text

    if args.chat and engine.tokenizer is None:
        raise SystemExit("--chat needs a tokenizer")
    if args.chat and not args.prompts:      # interactive: keep the conversation
        messages = []
        print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                break
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": stream(messages)})
        return 0
    if not args.prompts:
        raise SystemExit("give a prompt, e.g. pagestream generate \"What is the capital of France?\"")
    # An instruct model answers a question asked through its template; as raw text it may just end it.
    as_chat = args.chat or (not args.raw and engine.tokenizer is not None and engine.tokenizer.has_chat_template)
    for prompt in args.prompts:
        stream([{"role": "user", "content": prompt}] if as_chat else prompt)
    return 0


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless it says what the default is itself (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """A command's parser (subcommands of subcommands included: argparse makes them of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return args.func(args) or 0


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The CLI's parser; the flags of `serve` and `service` only when command names one of them."""
    parser = argparse.ArgumentParser(prog="pagestream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every command's flags show their defaults (the first hour is spent reading --help).
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate text for prompts, or chat")
    gen.add_argument("prompts", nargs="*",
                     help="prompts: sent as chat messages when the model has a chat template, else completed")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="with no prompt: chat interactively")
    mode.add_argument("--raw", action="store_true", help="complete the prompt text as is, without the template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    # The pipeline's flags come with the web stack's imports: only the commands that run it load them.
    serve = commands.add_parser("serve", help="serve the OpenAI API with every service of the pipeline")
    if command == "serve":
        from services.launcher import add_arguments as add_serve_args
        add_serve_args(serve)
        add_stack_args(serve)
    serve.set_defaults(func=cmd_serve, parser=serve)

    service = commands.add_parser("service", help="run one service of the pipeline (what containers run)")
    if command == "service":
        service.add_argument("service", choices=SERVICES)
        add_stack_args(service)
    service.set_defaults(func=cmd_service)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench", required=True)
    from loadtest.throughput import add_arguments as add_throughput_args, run as run_throughput
    tp = bench_kinds.add_parser("throughput", help="offline throughput on a fixed workload")
    add_throughput_args(tp)
    add_engine_args(tp)
    tp.set_defaults(func=run_throughput)
    from loadtest.throughput import add_latency_arguments, run_latency
    lat = bench_kinds.add_parser("latency", help="batch-1 decode latency")
    add_latency_arguments(lat)
    add_engine_args(lat)
    lat.set_defaults(func=run_latency)
    from loadtest.pipeline import add_arguments as add_pipeline_args, run as run_pipeline
    pipeline = bench_kinds.add_parser("pipeline", help="the same checkpoint and workload offline and served, in "
                                                       "one table (see loadtest/pipeline.py)")
    add_pipeline_args(pipeline)
    add_engine_args(pipeline)
    pipeline.set_defaults(func=run_pipeline, parser=pipeline)
    from loadtest.data_parallel import add_arguments as add_data_parallel_args, run as run_data_parallel
    data_parallel = bench_kinds.add_parser("data-parallel", help="one worker against N, and round-robin against "
                                                                 "prefix placement (see loadtest/data_parallel.py)",
                                           conflict_handler="resolve")
    add_engine_args(data_parallel)
    add_data_parallel_args(data_parallel)
    data_parallel.set_defaults(func=run_data_parallel, parser=data_parallel)
    from loadtest.serve import add_arguments as add_serve_bench_args, run as run_serve_bench
    serve_bench = bench_kinds.add_parser("serve", help="load an OpenAI-compatible server and measure it "
                                                       "(see loadtest/serve.py)")
    add_serve_bench_args(serve_bench)
    serve_bench.set_defaults(func=run_serve_bench)
    return parser


if __name__ == "__main__":
    sys.exit(main())
