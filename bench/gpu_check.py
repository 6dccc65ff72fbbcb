"""A once-off check for an operator with a GPU: memories served by vLLM on the GPU are right, and what they cost.

Starts the server on the embedded base (or ``--model``) with the bench's
6-layer memory (or ``--memory``) under vLLM's defaults for that machine (attention backend: FlashAttention), checks
the greedy tokens of a few memory requests (fp32, so they can be compared)
against the transformers oracle of the same formula, then serves in the
machine's default dtype and prints base and memory output tokens/s at 1 and
32 streams. Exit status 1 if any greedy continuation differs from the
oracle's. Not run by the test suite: this project's machines have no GPU with
vLLM (README, "Performance").

    bench/gpu_check.sh [--model DIR] [--memory DIR] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx

from bench.run import MEMORY_NAMES, default_memory
from bench.workload import make_prompts, run_streams
from server.launcher import ServerProcess, server_env

WEIGHT = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--memory", help="decoder memory directory (default: the bench's 6-layer memory initialised from the base)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens checked and generated per stream (default: %(default)s)")
    p.add_argument("--streams", default="1,32", help="stream counts to time (default: %(default)s)")
    return p


# memserve's model finds each row's tokens in the attention metadata (query_start_loc): the server refuses a GPU start without a backend that has it
ATTENTION = ["--attention-backend", "FLASH_ATTN"]


def check_tokens(base: Path, memory: Path, workdir: Path, tokens: int) -> bool:
    """Greedy tokens of memory requests, served in fp32, against the transformers oracle."""
    from memories.reference import ReferenceFusion

    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(4, 16, vocab, seed=1)
    args = ["--model", str(base), "--served-model-name", "base", "--memory", f"{MEMORY_NAMES[0]}={memory}", "--", "--dtype", "float32", *ATTENTION]
    with ServerProcess(args, workdir / "fp32", server_env(workdir)).running() as server:
        served = []
        for prompt in prompts:
            body = {"model": "base", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True, "domain": MEMORY_NAMES[0], "memory_weight": WEIGHT}
            served.append(httpx.post(server.url + "/v1/completions", json=body, timeout=600).json()["choices"][0]["token_ids"])
    oracle = ReferenceFusion(str(base), str(memory))
    good = True
    for i, (prompt, got) in enumerate(zip(prompts, served)):
        want = oracle.greedy(prompt, tokens, WEIGHT).tokens
        same = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        print(f"prompt {i}: {'same' if got == want else f'differs from token {same}'} ({tokens} greedy tokens, fp32)")
        good &= got == want
    return good


def throughput(base: Path, memory: Path, workdir: Path, tokens: int, streams: list[int]) -> None:
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    args = ["--model", str(base), "--served-model-name", "base", "--memory", f"{MEMORY_NAMES[0]}={memory}", "--", *ATTENTION]
    with ServerProcess(args, workdir / "default", server_env(workdir)).running() as server:
        print("| streams | base tok/s | memory tok/s | memory ÷ base |\n|---|---|---|---|")
        for n in streams:
            prompts = make_prompts(n, 64, vocab)
            for domain in (None, MEMORY_NAMES[0]):  # warm-up: first-request costs are not the workload
                asyncio.run(run_streams(server.url, "base", prompts, tokens, [domain] * n))
            base_tps = asyncio.run(run_streams(server.url, "base", prompts, tokens, [None] * n))["output_tokens_per_s"]
            mem_tps = asyncio.run(run_streams(server.url, "base", prompts, tokens, [MEMORY_NAMES[0]] * n))["output_tokens_per_s"]
            print(f"| {n} | {base_tps:.1f} | {mem_tps:.1f} | {mem_tps / base_tps:.3f} |")


def main(argv: list[str] | None = None) -> int:
    from memories.base_model import cache_dir, default_base

    opts = build_parser().parse_args(argv)
    base = Path(opts.model) if opts.model else default_base()
    memory = Path(opts.memory) if opts.memory else default_memory(base, 6)
    workdir = cache_dir() / "bench" / "gpu-check"
    good = check_tokens(base, memory, workdir, opts.tokens)
    throughput(base, memory, workdir, opts.tokens, [int(n) for n in opts.streams.split(",")])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
