"""What an engine option costs requests that do not use it: base-only greedy decode, option off vs on.

``--option lora``: vLLM's ``enable_lora``, as ``--max-loras N`` turns it on.
``--option model``: memserve's model (server/worker/model.py) with its row
bookkeeping, as memserve serves every Llama, Qwen2 or Mistral base.

Two engines, one per process (vLLM runs one per process), started side by
side and timed in alternating rounds, so that other jobs on a shared machine
slow both alike; medians are reported. Both decode the same prompts, so the
script also reports whether the option changes the base's tokens or logprobs.

    python -m bench.option_cost MODEL_DIR [--option lora|model] [--streams 8] [--tokens 64] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _child(model: str, streams: int, tokens: int, option: str | None, rank: int, max_loras: int) -> None:
    """Start an engine, then run one timed round per line read on stdin."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from server.worker import patches

    patches.install()  # as memserve's workers run
    extra = {}
    if option == "lora":
        extra = dict(enable_lora=True, max_lora_rank=rank, max_loras=max_loras, max_cpu_loras=max_loras)
    elif option == "model":
        from server.engine.keys import MODEL_ARCHITECTURES
        from server.engine.plugin import register
        from server.worker.rows import MemoryRows

        register()
        architecture = json.loads(open(os.path.join(model, "config.json")).read())["architectures"][0]
        extra = dict(hf_overrides={"architectures": [MODEL_ARCHITECTURES[architecture]]}, logits_processors=[MemoryRows])
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 30, **extra)
    prompts = [TokensPrompt(prompt_token_ids=[1 + (7 * i + 3 * j) % 200 for j in range(16)]) for i in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    print("READY", flush=True)
    for _ in sys.stdin:
        start, start_cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        result = [{"tokens": list(o.outputs[0].token_ids), "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]} for o in outs]
        # CPU ms per token of this process (engine in-process): less sensitive than wall time to other jobs
        print("RESULT " + json.dumps({"tokens_per_s": streams * tokens / wall, "cpu_ms_per_token": 1000 * cpu / (streams * tokens), "outputs": result}), flush=True)


def _read(proc, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :]
    sys.exit(f"engine exited:\n{proc.stderr.read()[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--option", choices=["lora", "model"], default="lora")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--child", choices=["off", "on"])
    a = p.parse_args()
    if a.child:
        return _child(a.model, a.streams, a.tokens, a.option if a.child == "on" else None, a.max_lora_rank, a.max_loras)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": "0"}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= 4:  # as memserve serve does on small machines (server/engine/cpu_defaults.py)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    procs = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, "-m", "bench.option_cost", a.model, "--option", a.option, "--child", mode, "--streams", str(a.streams), "--tokens", str(a.tokens), "--max-lora-rank", str(a.max_lora_rank), "--max-loras", str(a.max_loras)]
        procs[mode] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _read(procs[mode], "READY")  # one start at a time: they would slow each other's start
    runs = {"off": [], "on": []}
    for i in range(a.rounds):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            procs[mode].stdin.write("go\n")
            procs[mode].stdin.flush()
            runs[mode].append(json.loads(_read(procs[mode], "RESULT ")))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    off, on = runs["off"][-1]["outputs"], runs["on"][-1]["outputs"]

    def median(mode, key):
        return statistics.median(r[key] for r in runs[mode])

    print(json.dumps({
        "option": a.option, "streams": a.streams, "tokens": a.tokens, "rounds": a.rounds, "max_lora_rank": a.max_lora_rank, "max_loras": a.max_loras,
        "tokens_per_s_off": [round(r["tokens_per_s"], 1) for r in runs["off"]],
        "tokens_per_s_on": [round(r["tokens_per_s"], 1) for r in runs["on"]],
        "cpu_ms_per_token_off": [round(r["cpu_ms_per_token"], 2) for r in runs["off"]],
        "cpu_ms_per_token_on": [round(r["cpu_ms_per_token"], 2) for r in runs["on"]],
        "median_tokens_per_s_ratio_on_over_off": round(median("on", "tokens_per_s") / median("off", "tokens_per_s"), 3),
        "median_cpu_per_token_ratio_on_over_off": round(median("on", "cpu_ms_per_token") / median("off", "cpu_ms_per_token"), 3),
        "base_tokens_identical": all(x["tokens"] == y["tokens"] for x, y in zip(off, on)),
        "max_abs_logprob_diff": max(abs(u - v) for x, y in zip(off, on) for u, v in zip(x["logprobs"], y["logprobs"])),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
