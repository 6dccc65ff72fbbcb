"""What ``enable_lora`` costs requests that use no adapter: base-only greedy decode, LoRA off vs on.

Each configuration runs in its own process (vLLM's engine is one per process);
both decode the same prompts, so the script also reports whether enabling
LoRA changes the base's tokens or logprobs.

    python -m bench.lora_cost MODEL_DIR [--streams 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {"lora-off": [], "lora-on": ["--enable-lora"]}


def _child(model: str, streams: int, tokens: int, repeats: int, lora: bool, rank: int, max_loras: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = dict(enable_lora=True, max_lora_rank=rank, max_loras=max_loras, max_cpu_loras=max_loras) if lora else {}
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 30, **extra)
    prompts = [TokensPrompt(prompt_token_ids=[1 + (7 * i + 3 * j) % 200 for j in range(16)]) for i in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    rates, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(streams * tokens / (time.perf_counter() - start))
        # CPU seconds per token of this process (engine in-process): less sensitive than wall time to other jobs on the machine
        cpu.append((time.process_time() - start_cpu) / (streams * tokens))
    result = [{"tokens": list(o.outputs[0].token_ids), "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]} for o in outs]
    print("RESULT " + json.dumps({"tokens_per_s": rates, "cpu_ms_per_token": [1000 * c for c in cpu], "outputs": result}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--child", choices=["off", "on"])
    a = p.parse_args()
    if a.child:
        return _child(a.model, a.streams, a.tokens, a.repeats, a.child == "on", a.max_lora_rank, a.max_loras)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": "0"}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= 4:  # as memserve serve does on small machines (server/cpu_defaults.py)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    runs = {}
    for mode in ("off", "on"):  # (load from other jobs varies: run it twice, or with --repeats 5)
        cmd = [sys.executable, "-m", "bench.lora_cost", a.model, "--child", mode, "--streams", str(a.streams), "--tokens", str(a.tokens), "--repeats", str(a.repeats), "--max-lora-rank", str(a.max_lora_rank), "--max-loras", str(a.max_loras)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"lora {mode} failed:\n{out.stderr[-3000:]}")
        runs[mode] = json.loads(line[len("RESULT ") :])
    off, on = runs["off"], runs["on"]
    same_tokens = [a_["tokens"] == b_["tokens"] for a_, b_ in zip(off["outputs"], on["outputs"])]
    diff = max(abs(x - y) for a_, b_ in zip(off["outputs"], on["outputs"]) for x, y in zip(a_["logprobs"], b_["logprobs"]))
    best_off, best_on = max(off["tokens_per_s"]), max(on["tokens_per_s"])
    cpu_off, cpu_on = min(off["cpu_ms_per_token"]), min(on["cpu_ms_per_token"])
    print(json.dumps({
        "streams": a.streams, "tokens": a.tokens, "max_lora_rank": a.max_lora_rank, "max_loras": a.max_loras,
        "tokens_per_s_lora_off": [round(r, 1) for r in off["tokens_per_s"]],
        "tokens_per_s_lora_on": [round(r, 1) for r in on["tokens_per_s"]],
        "slowdown_best": round(1 - best_on / best_off, 3),
        "cpu_ms_per_token_lora_off": [round(c, 2) for c in off["cpu_ms_per_token"]],
        "cpu_ms_per_token_lora_on": [round(c, 2) for c in on["cpu_ms_per_token"]],
        "cpu_cost_best": round(cpu_on / cpu_off - 1, 3),
        "base_tokens_identical": all(same_tokens), "max_abs_logprob_diff": diff,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
