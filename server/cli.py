"""``memserve`` command line: ``serve`` runs the server; ``memory ...`` builds and manages memories; ``generator ...`` builds the LoRA generator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys

from server.config import ServeOptions, add_serve_arguments

log = logging.getLogger("memserve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve", description="OpenAI-compatible LLM server with per-request domain memories (Memory Decoder) on vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve a base model with vLLM and fuse a memory into any request that names one "
        "(body 'domain', header 'X-Domain', or 'model' = memory name). Arguments after '--' go to vLLM's engine unchanged.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    memory = commands.add_parser(
        "memory",
        help="build memories; load, unload and list them on a running server",
        description="Offline builds: build --kind decoder|calm|lora (compose = build --kind calm, build-lora = build --kind lora; a decoder build's stages one by one: "
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
    from server.startup import run

    try:
        return asyncio.run(run(ServeOptions.from_cli(opts)))
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
