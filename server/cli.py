"""``memserve`` command line: ``serve`` runs the server; ``memory ...`` builds and manages memories; ``generator ...`` builds the LoRA generator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("memserve")

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts


def _memory_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve", description="OpenAI-compatible LLM server with per-request domain memories (Memory Decoder) on vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve a base model with vLLM and fuse a memory into any request that names one "
        "(body 'domain', header 'X-Domain', or 'model' = memory name). Arguments after '--' go to vLLM's engine unchanged.",
    )
    serve.add_argument("--model", help="Hugging Face causal-LM directory of the base (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", help="model id clients use for the base (default: the directory's name)")
    serve.add_argument("--memory", dest="memories", action="append", type=_memory_spec, default=[], metavar="NAME=DIR", help="load a memory at start-up (repeatable; default: none, or without --model every demo memory in <cache>/memories)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--default-memory-weight", type=_fraction, default=None, metavar="λ", help="λ for memories whose memory.json sets none (default 0.5)")
    serve.add_argument(
        "--default-domain", choices=("none", "auto"), default="none",
        help="memory for requests that name none (no domain, X-Domain or memory model): none, the base alone; or auto, the memory "
        "the router picks for the prompt, or none when no memory fits, as with domain 'auto' (default: %(default)s)",
    )  # fmt: skip
    serve.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes (default: none, /v1 is open)")
    serve.add_argument("--tensor-parallel-size", type=int, default=1, help="devices every layer of the base is split across (vLLM tensor parallelism; default: %(default)s)")
    serve.add_argument("--pipeline-parallel-size", type=int, default=1, help="devices the base's layers are divided between in stages (vLLM pipeline parallelism; default: %(default)s)")
    admin = serve.add_argument_group("memory store and admin API")
    admin.add_argument("--memory-root", help="folder of memory artifacts; admin loads must resolve inside it, and the loaded set persists there (default: none, admin loads are refused)")
    admin.add_argument("--admin-token", help="bearer token for /admin routes (default: $MEMSERVE_ADMIN_TOKEN; without either the routes are off)")
    admin.add_argument("--admin-insecure-local", action="store_true", help="enable /admin without a token when listening on loopback only")
    admin.add_argument("--max-memories", type=int, default=None, help="refuse loads beyond this many memories (default: no limit)")
    admin.add_argument(
        "--max-loras", type=_count, default=None, metavar="N",
        help="lora memories (PEFT LoRA adapters) that may be loaded at once; N > 0 starts vLLM with multi-LoRA on "
        "(enable_lora, max_loras N, max_cpu_loras 2N), which slows every batch, adapter or not (measured in README); "
        "0: LoRA off, lora memories are refused (default: 4 if a start-up memory, from --memory, the demo memories "
        "or the memory root's persisted set, is a lora memory, else 0)",
    )  # fmt: skip
    admin.add_argument(
        "--max-lora-rank", type=int, choices=LORA_RANKS, default=16, metavar="R",
        help=f"highest LoRA rank (r) a lora memory may have; vLLM sizes its adapter slots by it. One of {', '.join(map(str, LORA_RANKS))} (default: %(default)s)",
    )  # fmt: skip
    admin.add_argument(
        "--calm", choices=("auto", "on", "off"), default="auto",
        help="serve the base through memserve's calm model, which calm memories need (a Llama base; the model runs eagerly). "
        "auto: on for a Llama base on CPU, where it costs nothing while no calm memory runs, and elsewhere only when a "
        "start-up memory is a calm memory; off: calm memories are refused (default: %(default)s)",
    )  # fmt: skip
    admin.add_argument(
        "--generator", default=None, metavar="DIR",
        help="prompt-to-LoRA generator (built by `memserve generator build|demo`): admin loads may then carry 'prompts' instead of "
        "'path', and the server generates, checks and loads a lora memory from them, written under <memory-root>/generated/. "
        "Needs --memory-root and the admin API; turns LoRA on (default: <cache>/generator when serving the embedded base "
        "with both, else none)",
    )  # fmt: skip
    admin.add_argument(
        "--memory-budget-bytes", type=int, default=None,
        help="device bytes for all memories (weights + --memory-kv-budget per decoder or calm memory): loads beyond it are refused, and on GPUs vLLM's share is lowered by it (default: no limit)",
    )  # fmt: skip
    admin.add_argument(
        "--memory-kv-budget", dest="memory_kv_budget_bytes", type=int, default=None, metavar="BYTES",
        help="cache bytes per decoder or calm memory. A decoder memory's KV pool: beyond it the least recently used sequence is evicted "
        "and recomputed. A calm memory's caches (its augmenting model's KV pool and its cross-attention keys and values): they hold "
        "BYTES / (one row of --max-model-len tokens) rows, and requests beyond them get 503 until rows end; freed when rows end "
        "(default: grow as needed)",
    )  # fmt: skip
    admin.add_argument("--reconcile-interval", type=float, default=10.0, help="seconds between re-reads of the store's desired set; 0: only at start and on admin calls (default: %(default)s)")
    admin.add_argument("--unload-timeout", type=float, default=30.0, help="seconds an unload waits for running requests before ending them with an error (default: %(default)s)")
    limits = serve.add_argument_group("request limits and shutdown")
    limits.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request body accepted, in bytes; larger ones get 413 (default: %(default)s)")
    limits.add_argument("--max-n", type=int, default=16, help="most choices (n, best_of) one request may ask for (default: %(default)s)")
    limits.add_argument(
        "--max-scoring-tokens", type=int, default=4096,
        help="longest prompt a memory scores for echo + logprobs (it runs in one pass inside the engine loop) (default: %(default)s)",
    )  # fmt: skip
    limits.add_argument(
        "--shutdown-grace", type=float, default=30.0,
        help="on SIGTERM, seconds running requests may take to finish while new ones get 503; 0 stops at once (default: %(default)s)",
    )  # fmt: skip
    serve.add_argument("--workdir", type=Path, default=None, help="folder for vLLM's caches and sockets (default: <cache>/run)")
    serve.add_argument("engine_args", nargs=argparse.REMAINDER, help="-- then vLLM engine flags, passed unchanged (e.g. -- --dtype float32 --kv-cache-memory-bytes 4294967296)")
    serve.set_defaults(func=_serve)

    memory = commands.add_parser(
        "memory",
        help="build memories; load, unload and list them on a running server",
        description="Offline builds: build --kind decoder|calm (compose = build --kind calm; a decoder build's stages one by one: "
        "datastore, index, targets, train, evaluate, package), generate (a lora memory from prompts), demo and calm-demo "
        "(the demo memories), augment (a calm demo's augmenting model). On a running server, through its admin API: "
        "load, unload, list.",
    )
    memory_commands = memory.add_subparsers(dest="memory_command", required=True)
    from memories.cli import add_memory_commands
    from server.admin_client import add_admin_client_commands
    from server.route_eval import add_route_eval_command

    add_memory_commands(memory_commands)
    add_admin_client_commands(memory_commands)
    add_route_eval_command(memory_commands)

    generator = commands.add_parser(
        "generator",
        help="build the prompt-to-LoRA generator (Drag-and-Drop LLMs) that `memory generate` uses",
        description="Train a generator that turns a handful of unlabeled prompts into a LoRA for the base (build), "
        "or build the default base's generator into the cache (demo).",
    )
    from memories.lora.cli import add_generator_commands

    add_generator_commands(generator.add_subparsers(dest="generator_command", required=True))

    bench = commands.add_parser(
        "bench", add_help=False, prefix_chars="\0",
        help="measure served throughput with and without memories against the compute bound (`memserve bench --help` lists its flags)",
    )  # fmt: skip
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags, passed to `python -m bench` (default: none, its defaults)")
    bench.set_defaults(func=_bench)
    return parser


def _bench(opts: argparse.Namespace) -> int:
    """The benchmark is a client of the server (bench/ starts servers through server/launcher.py), so it runs as its own program, not imported."""
    return subprocess.call([sys.executable, "-m", "bench", *opts.bench_args])


def _serve(opts: argparse.Namespace) -> int:
    from memories.base_model import cache_dir
    from server.engine.client import prepare_environment

    prepare_environment(opts.workdir or cache_dir() / "run")
    from server.startup import ServeOptions, run

    extra = opts.engine_args[1:] if opts.engine_args[:1] == ["--"] else opts.engine_args
    try:
        return asyncio.run(run(ServeOptions.from_cli(opts, extra)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.info("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["memory"]:
        from memories.cli import route_kind

        argv = ["memory", *route_kind(argv[1:])]
    opts = build_parser().parse_args(argv)
    return opts.func(opts) or 0


if __name__ == "__main__":
    sys.exit(main())
