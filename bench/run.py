"""``memserve bench``: served throughput with and without memories, against the compute bound.

One run, one machine: the base alone, every request on one memory, an even
mix of the base and three memories, and the transformers two-model reference
loop, all on the same prompts. Ratios are what matter; absolute numbers
depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import tempfile
from pathlib import Path

from bench.flops import compute_bound
from bench.reference_loop import reference_throughput
from bench.server_process import ServerProcess
from bench.workload import make_prompts, run_streams
from memories.artifact import write_json_atomic

log = logging.getLogger("memserve.bench")
MEMORY_NAMES = ("mem1", "mem2", "mem3")


def add_bench_command(commands) -> None:
    p = commands.add_parser("bench", help="measure fused vs base throughput against the compute bound", description=__doc__)
    p.add_argument("--model", help="base directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--memory", help="memory directory (default: a memory of --memory-layers layers initialised from the base)")
    p.add_argument("--memory-layers", type=int, default=6, help="depth of the default memory (default: %(default)s)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per stream (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per stream (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="32-token prompts and outputs (under 3 minutes on the default model)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference loop")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def _default_memory(base: Path, layers: int) -> Path:
    from transformers import AutoTokenizer

    from memories.train import init_memory
    from server.base_model import cache_dir

    out = cache_dir() / "bench" / f"{base.name}-first{layers}"
    if not (out / "config.json").exists():
        log.info("creating an untrained %d-layer memory from %s for timing", layers, base)
        tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
        init_memory(base, layers, "first").save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return out


def main(opts: argparse.Namespace) -> int:
    from server.base_model import cache_dir, default_base

    if opts.quick:
        opts.prompt_len = opts.output_len = 32
    base = Path(opts.model) if opts.model else default_base()
    memory = Path(opts.memory) if opts.memory else _default_memory(base, opts.memory_layers)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(opts.streams, opts.prompt_len, vocab, opts.seed)
    bound = compute_bound(base, memory)

    args = ["--model", str(base), "--served-model-name", "base", "--max-model-len", str(opts.prompt_len + opts.output_len + 16)]
    for name in MEMORY_NAMES:
        args += ["--memory", f"{name}={memory}"]
    server = ServerProcess(args, cache_dir() / "bench" / "run")
    try:
        startup = server.wait_ready()
        log.info("server ready in %.1fs", startup)

        def scenario(domains):
            return asyncio.run(run_streams(server.url, "base", prompts, opts.output_len, domains))

        scenario([None] * len(prompts))  # warm-up: first-request costs are not the workload
        scenarios = {
            "base": scenario([None] * len(prompts)),
            "memory": scenario([MEMORY_NAMES[0]] * len(prompts)),
            "mixed": scenario([(*MEMORY_NAMES, None)[i % 4] for i in range(len(prompts))]),
        }
    finally:
        server.stop()
    if not opts.no_reference:
        scenarios["reference"] = reference_throughput(str(base), str(memory), prompts, opts.output_len)
    base_tps = scenarios["base"]["output_tokens_per_s"]
    for s in scenarios.values():
        s["ratio_to_base"] = s["output_tokens_per_s"] / base_tps
    result = {"compute_bound": bound, "streams": opts.streams, "startup_s": startup, "scenarios": scenarios}
    print(markdown(result))
    if opts.json:
        write_json_atomic(opts.json, result)
    return 0


def markdown(r: dict) -> str:
    s = r["scenarios"]
    rows = [
        f"streams: {r['streams']}   compute bound (base FLOPs ÷ base+memory FLOPs): {r['compute_bound']:.3f}",
        "",
        "| scenario | output tok/s | TTFT p50 (s) | ITL p50 (s) | ITL p99 (s) | ÷ base |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        rows.append(f"| {name} | {v['output_tokens_per_s']:.1f} | {v['ttft_p50_s']:.3f} | {v['itl_p50_s']:.4f} | {v['itl_p99_s']:.4f} | {v['ratio_to_base']:.3f} |")
    mem = s["memory"]["ratio_to_base"]
    rows += ["", f"- fused ÷ base = {mem:.3f} = {mem / r['compute_bound']:.2f} × the compute bound (target ≥ 0.9)"]
    rows.append(f"- mixed ÷ single-memory = {s['mixed']['output_tokens_per_s'] / s['memory']['output_tokens_per_s']:.3f} (target ≥ 0.95)")
    if "reference" in s and not math.isnan(s["reference"]["output_tokens_per_s"]):
        rows.append(f"- fused ÷ reference loop = {s['memory']['output_tokens_per_s'] / s['reference']['output_tokens_per_s']:.2f} (target ≥ 2 at 8 streams)")
    return "\n".join(rows)
