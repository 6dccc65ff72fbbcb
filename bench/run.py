"""``memserve bench``: served throughput with and without memories, against the compute bound.

One run, one machine, one server: for each stream count, the base alone,
every request on one memory, an even mix of three memories and the base,
every request a mixture of two memories fused together (``domain`` =
``{"mem1": 0.25, "mem2": 0.25}``), and
the transformers two-model reference loop (in the server's dtype, on as many
threads as its worker), all on the same prompts. Ratios are what matter;
absolute numbers depend on the machine, so the machine, the engine's dtype and
threads and the software versions are recorded with them. Arguments after
'--' go to the server's engine (e.g. -- --dtype float32); the engine's thread
layout follows VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU as in
`memserve serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import math
import statistics
import tempfile
from pathlib import Path

from bench.flops import compute_bound, mixture_bound
from bench.reference_loop import DTYPES, reference_throughput
from server.launcher import ServerProcess, server_env
from bench.workload import make_prompts, run_streams
from memories.artifact import write_json_atomic
from memories.kinds import kind_of

log = logging.getLogger("memserve.bench")
MEMORY_NAMES = ("mem1", "mem2", "mem3")
SCENARIOS = ("base", "memory", "mixed", "mixture", "plain")  # plain: the base on a second server with no memories (and no slots)
MIXTURE = {MEMORY_NAMES[0]: 0.25, MEMORY_NAMES[1]: 0.25}  # the "mixture" scenario: two memories fused in every request


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"stream counts must be ≥ 1, got {text!r}")
    return values


def _scenario_list(text: str) -> list[str]:
    names = text.split(",")
    if unknown := set(names) - set(SCENARIOS):
        raise argparse.ArgumentTypeError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return names


def build_parser(prog: str = "memserve bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--memory", help="memory directory, of any kind (default: a decoder memory of --memory-layers layers initialised from the base); the mixture scenario needs a decoder memory")
    p.add_argument("--memory-layers", type=int, default=6, help="depth of the default memory (default: %(default)s)")
    p.add_argument("--thin", action="store_true", help="the default memory is thin: it runs on the base's embedding and head, shared by all memories in a step")
    p.add_argument("--streams", type=_int_list, default="1,8,32", metavar="N[,N...]", help="concurrent stream counts, each measured in turn (default: %(default)s)")
    p.add_argument("--scenarios", type=_scenario_list, default=",".join(SCENARIOS), metavar="NAME[,NAME...]", help="served scenarios to run (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per stream (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per stream (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="32-token prompts and outputs (a few minutes on the default model)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference loop")
    p.add_argument("--json", type=Path, help="also write the results to this file (default: print only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts (default: %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=3,
        help="rounds per stream count; each round runs every scenario once, in an order rotated by one each round, and ratios are "
        "taken within a round, so a load change on a shared machine moves both sides of a ratio (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("engine_args", nargs=argparse.REMAINDER, help="-- then vLLM engine flags for the server, passed unchanged (default: none)")
    return p


def default_memory(base: Path, layers: int, thin: bool = False) -> Path:
    from transformers import AutoTokenizer

    from memories.artifact import MEMORY_JSON, write_json_atomic
    from memories.decoder.package import without_base_tensors
    from memories.training import init_memory
    from memories.base_model import cache_dir

    out = cache_dir() / "bench" / f"{base.name}-first{layers}{'-thin' if thin else ''}"
    if not (out / "config.json").exists():
        log.info("creating an untrained %d-layer%s memory from %s for timing", layers, " thin" if thin else "", base)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        init_memory(base, layers, "first").save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        if thin:
            for f in tmp.glob("*.safetensors"):
                without_base_tensors(f, f.with_suffix(".thin"))
                f.with_suffix(".thin").rename(f)
            write_json_atomic(tmp / MEMORY_JSON, {"embeddings": "base"})
        tmp.rename(out)
    return out


def _versions() -> dict[str, str]:
    found = {}
    for name, dists in (("torch", ["torch"]), ("vllm", ["vllm", "vllm-cpu"]), ("transformers", ["transformers"]), ("memserve", ["memserve"])):
        for dist in dists:
            try:
                found[name] = f"{dist} {importlib.metadata.version(dist)}"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            found[name] = "not installed"
    return found


def describe_setup(engine_extra: list[str], env: dict[str, str]) -> dict:
    """The machine and what the server's engine will run with (the same decision `memserve serve` makes)."""
    from server.engine.cpu_defaults import REPORTED_FLAGS, choose, read_machine

    machine = read_machine()
    choice = choose(machine, env, engine_extra)
    return {
        "machine": {"cpu": machine.model_name, "arch": machine.arch, "cpus": len(machine.cpus), "flags": [f for f in REPORTED_FLAGS if f in machine.flags]},
        "engine": {"dtype": choice.dtype, "worker_threads": choice.worker_threads, "engine_args": engine_extra, "choices": choice.log},
        "versions": _versions(),
    }


def main(opts: argparse.Namespace) -> int:
    from memories.base_model import cache_dir, default_base

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the results
    if opts.quick:
        opts.prompt_len = opts.output_len = 32
    extra = opts.engine_args[1:] if opts.engine_args[:1] == ["--"] else opts.engine_args
    base = Path(opts.model) if opts.model else default_base()
    memory = Path(opts.memory) if opts.memory else default_memory(base, opts.memory_layers, opts.thin)
    kind = kind_of(memory, "bench")
    if kind != "decoder" and "mixture" in opts.scenarios:
        log.info("no mixture scenario for a %s memory (mixtures fuse decoder memories)", kind)
        opts.scenarios = [s for s in opts.scenarios if s != "mixture"]
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompts = {n: make_prompts(n, opts.prompt_len, vocab, opts.seed) for n in opts.streams}
    workdir = cache_dir() / "bench" / "run"
    env = server_env(workdir)
    setup = describe_setup(extra, env)

    args = ["--model", str(base), "--served-model-name", "base", "--max-model-len", str(opts.prompt_len + opts.output_len + 16)]
    for name in MEMORY_NAMES:
        args += ["--memory", f"{name}={memory}"]
    if kind == "decoder":  # slots as deep as the memory: no KV cache for layers it does not have
        args += ["--decoder-layers", str(json.loads((memory / "config.json").read_text())["num_hidden_layers"])]
    server = ServerProcess([*args, "--", *extra] if extra else args, workdir, env)
    plain = None
    if "plain" in opts.scenarios:  # the same engine without memories: what having them loaded costs base rows
        plain_args = [*args[:6], "--decoder-slots", "0"]
        plain = ServerProcess([*plain_args, "--", *extra] if extra else plain_args, workdir.parent / "plain", env)
    runs = {n: {} for n in opts.streams}
    try:
        startup = server.wait_ready()
        log.info("server ready in %.1fs", startup)
        if plain is not None:
            plain.wait_ready()

        def served(n: int, domains, on: ServerProcess = server):
            return asyncio.run(run_streams(on.url, "base", prompts[n], opts.output_len, domains))

        served(max(opts.streams), [None] * max(opts.streams))  # warm-up: first-request costs are not the workload
        if plain is not None:
            served(max(opts.streams), [None] * max(opts.streams), plain)
        for n in opts.streams:
            domains = {
                "base": [None] * n,
                "memory": [MEMORY_NAMES[0]] * n,
                "mixed": [(*MEMORY_NAMES, None)[i % 4] for i in range(n)],
                "mixture": [MIXTURE] * n,
            }
            rounds = []
            for r in range(opts.rounds):
                order = opts.scenarios[r % len(opts.scenarios) :] + opts.scenarios[: r % len(opts.scenarios)]
                rounds.append({})
                for name in order:
                    rounds[-1][name] = served(n, [None] * n, plain) if name == "plain" else served(n, domains[name])
                    log.info("%d streams, round %d, %s: %.1f tok/s", n, r + 1, name, rounds[-1][name]["output_tokens_per_s"])
            runs[n] = summarize_rounds(rounds)
    finally:
        server.stop()
        if plain is not None:
            plain.stop()
    engine = setup["engine"]
    if kind != "decoder" and not opts.no_reference:
        log.info("no reference loop for a %s memory (the loop fuses a decoder memory)", kind)
    if not opts.no_reference and kind == "decoder":
        dtype = engine["dtype"] if engine["dtype"] in DTYPES else "float32"
        engine["reference"] = {"dtype": dtype, "threads": engine["worker_threads"]}
        for n in opts.streams:
            runs[n]["reference"] = reference_throughput(str(base), str(memory), prompts[n], opts.output_len, dtype, engine["worker_threads"])
    for scenarios in runs.values():
        if "reference" in scenarios:  # measured once, after the server rounds
            base_tps = scenarios.get("base", {}).get("output_tokens_per_s", math.nan)
            scenarios["reference"]["ratio_to_base"] = scenarios["reference"]["output_tokens_per_s"] / base_tps
    result = {
        **setup,
        "compute_bound": compute_bound(base, memory),
        "mixture_bound": mixture_bound(base, [memory] * len(MIXTURE)),
        "prompt_len": opts.prompt_len,
        "output_len": opts.output_len,
        "startup_s": startup,
        "runs": [{"streams": n, "scenarios": runs[n]} for n in opts.streams],
    }
    print(markdown(result))
    if opts.json:
        write_json_atomic(opts.json, result)
    return 0


def summarize_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each scenario's medians over the rounds, and its ratio to base as the median (and spread) of per-round ratios.

    A ratio is taken within a round, base and scenario measured minutes apart at
    most, rather than between medians gathered at different times.
    """
    out = {}
    for name in rounds[0]:
        stats = [r[name] for r in rounds]
        out[name] = {key: statistics.median(s[key] for s in stats) for key in stats[0]}
        out[name]["rounds"] = len(stats)
        if all("base" in r for r in rounds):
            ratios = [r[name]["output_tokens_per_s"] / r["base"]["output_tokens_per_s"] for r in rounds]
            out[name]["ratio_to_base"] = statistics.median(ratios)
            out[name]["ratio_spread"] = [min(ratios), max(ratios)]
        else:
            out[name]["ratio_to_base"] = math.nan
    return out


def markdown(r: dict) -> str:
    m, e, v = r["machine"], r["engine"], r["versions"]
    ref = e.get("reference")
    rows = [
        f"CPU: {m['cpu']} ({m['arch']}, {m['cpus']} CPUs; flags: {' '.join(m['flags']) or 'none of the reported ones'})",
        f"engine: dtype {e['dtype']}, {e['worker_threads']} worker threads"
        + (f"; reference loop: {ref['dtype']}, {ref['threads']} threads" if ref else ""),
        f"versions: {', '.join(v.values())}",
        f"{r['prompt_len']}-token prompts, {r['output_len']}-token outputs; compute bound (base FLOPs ÷ base+memory FLOPs): {r['compute_bound']:.3f}",
        "",
        "| streams | scenario | output tok/s (median) | TTFT p50 (s) | ITL p50 (s) | ITL p99 (s) | ÷ base (median of rounds, min–max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        for name, s in run["scenarios"].items():
            spread = f" ({s['ratio_spread'][0]:.3f}–{s['ratio_spread'][1]:.3f}, {s['rounds']} rounds)" if "ratio_spread" in s else ""
            rows.append(
                f"| {run['streams']} | {name} | {s['output_tokens_per_s']:.1f} | {s['ttft_p50_s']:.3f} | {s['itl_p50_s']:.4f} | {s['itl_p99_s']:.4f} | {s['ratio_to_base']:.3f}{spread} |"
            )
    rows.append("")
    for run in r["runs"]:
        rows += targets(run["streams"], run["scenarios"], r["compute_bound"], r.get("mixture_bound"))
    return "\n".join(rows)


def targets(streams: int, s: dict, bound: float, mix_bound: float | None = None) -> list[str]:
    out = []
    if "memory" in s and "base" in s:
        mem = s["memory"]["ratio_to_base"]
        out.append(f"- {streams} streams: fused ÷ base = {mem:.3f} = {mem / bound:.2f} × the compute bound (target ≥ 0.9)")
    if "mixed" in s and "memory" in s:
        out.append(f"- {streams} streams: mixed ÷ single-memory = {s['mixed']['output_tokens_per_s'] / s['memory']['output_tokens_per_s']:.3f} (target ≥ 0.95)")
    if "mixture" in s and "memory" in s and mix_bound:
        ratio, best = s["mixture"]["output_tokens_per_s"] / s["memory"]["output_tokens_per_s"], mix_bound / bound
        out.append(
            f"- {streams} streams: mixture of two ÷ single-memory = {ratio:.3f}; its compute bound "
            f"(base + memory FLOPs) ÷ (base + 2 memories' FLOPs) = {best:.3f}, so {ratio / best:.2f} × the bound"
        )
    if "plain" in s and "base" in s:
        ratio = s["base"]["output_tokens_per_s"] / s["plain"]["output_tokens_per_s"]
        out.append(f"- {streams} streams: base rows with memories loaded ÷ a server without memories = {ratio:.3f} (target ≥ 0.97)")
    if "reference" in s and "memory" in s:
        out.append(f"- {streams} streams: fused ÷ same-dtype reference loop = {s['memory']['output_tokens_per_s'] / s['reference']['output_tokens_per_s']:.2f} (target ≥ 2 at 8 streams)")
    return out
