"""Greedy token ids from plain vLLM (no memserve processor): the baseline for 'no domain'.

Run as a subprocess: ``python -m tests.plain_vllm MODEL_DIR MAX_TOKENS PROMPT_IDS_JSON [--enable-lora]``
(``--enable-lora``: vLLM's multi-LoRA on, no adapter used, as memserve runs base rows when lora memories may load).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    lora = dict(enable_lora=True, max_loras=4, max_lora_rank=16) if "--enable-lora" in sys.argv[4:] else {}
    llm = LLM(model=model, enforce_eager=True, dtype="float32", max_model_len=512, kv_cache_memory_bytes=1 << 30, **lora)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    result = [{"tokens": list(o.outputs[0].token_ids), "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]} for o in outs]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
