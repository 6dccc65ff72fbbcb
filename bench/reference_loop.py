"""The reference: a transformers two-model loop in the style of the Memory Decoder demo.

Base and memory each keep a transformers KV cache; every step both run on the
new token for all streams, the distributions are fused with ``fuse()`` and the
argmax is taken. This is what serving must beat, so it runs like the server:
in the engine's dtype, on as many threads as the engine's worker.
"""

from __future__ import annotations

import time

import torch

from bench.workload import percentile
from memories.fuse import fuse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.inference_mode()
def reference_throughput(
    base_dir: str, memory_dir: str, prompts: list[list[int]], max_tokens: int, dtype: str, threads: int, weight: float = 0.5
) -> dict:
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype]).eval()
        memory = AutoModelForCausalLM.from_pretrained(memory_dir, dtype=DTYPES[dtype]).eval()
        ids = torch.tensor(prompts)  # equal lengths: no padding needed
        start = time.perf_counter()
        b_out = base(ids, use_cache=True)
        m_out = memory(ids, use_cache=True)
        stamps = []  # when each step's tokens exist; every stream gets one token per step
        for step in range(max_tokens):
            logp = fuse(b_out.logits[:, -1], m_out.logits[:, -1], weight)
            nxt = logp.argmax(-1, keepdim=True)
            stamps.append(time.perf_counter())
            if step == max_tokens - 1:
                break
            b_out = base(nxt, past_key_values=b_out.past_key_values, use_cache=True)
            m_out = memory(nxt, past_key_values=m_out.past_key_values, use_cache=True)
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return {
        "output_tokens_per_s": len(prompts) * max_tokens / wall,
        "ttft_p50_s": stamps[0] - start,
        "itl_p50_s": percentile(steps, 50),
        "itl_p99_s": percentile(steps, 99),
    }
