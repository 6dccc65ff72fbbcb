"""The reference: a transformers two-model loop in the style of the Memory Decoder demo.

Base and memory each keep a transformers KV cache; every step both run on the
new token for all streams, the distributions are fused with ``fuse()`` and the
argmax is taken. This is what serving must beat.
"""

from __future__ import annotations

import time

import torch

from memories.fuse import fuse


@torch.inference_mode()
def reference_throughput(base_dir: str, memory_dir: str, prompts: list[list[int]], max_tokens: int, weight: float = 0.5) -> dict:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    memory = AutoModelForCausalLM.from_pretrained(memory_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    start = time.perf_counter()
    b_out = base(ids, use_cache=True)
    m_out = memory(ids, use_cache=True)
    ttft = None
    for step in range(max_tokens):
        logp = fuse(b_out.logits[:, -1], m_out.logits[:, -1], weight)
        nxt = logp.argmax(-1, keepdim=True)
        if ttft is None:
            ttft = time.perf_counter() - start
        if step == max_tokens - 1:
            break
        b_out = base(nxt, past_key_values=b_out.past_key_values, use_cache=True)
        m_out = memory(nxt, past_key_values=m_out.past_key_values, use_cache=True)
    wall = time.perf_counter() - start
    itl = (wall - ttft) / max(1, max_tokens - 1)
    return {"output_tokens_per_s": len(prompts) * max_tokens / wall, "ttft_p50_s": ttft, "itl_p50_s": itl, "itl_p99_s": itl}
