"""Fused prompt logprobs (``echo`` + ``logprobs`` on /v1/completions) for memory requests.

vLLM computes prompt logprobs from the base's logits inside the model
runner, where no logits processor runs. This engine-client proxy sits between
vLLM's OpenAI layer and the engine: when a memory request asked for prompt
logprobs, it asks the workers for the memory's own prompt pass and replaces
every reported value with the fused one (``memories.fuse.mix``; a mixture asks
each of its decoder memories and mixes them all in the one formula), before vLLM
formats the response. Evaluation harnesses that score text through the API
(lm-evaluation-harness ``local-completions``) therefore measure base + memory.

The alternatives reported at each prompt position are the base's top-k,
re-scored under the fused distribution; a token that only the memory ranks
highly is not added.
"""

from __future__ import annotations

import torch
from server.engine.vllm_openai import Logprob, VLLMValidationError

from memories.fuse import mix
from server.engine.keys import read_decoder_parts


class FusedPromptLogprobsClient:
    def __init__(self, engine, base_width: int, max_scoring_tokens: int):
        self._engine = engine
        self._base_width = base_width
        self._max_scoring_tokens = max_scoring_tokens

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        spec = read_decoder_parts(sampling_params.extra_args) if sampling_params.prompt_logprobs is not None else None
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
        if spec and len(ids or ()) > self._max_scoring_tokens:
            # the memory scores the whole prompt in one pass inside the engine loop: bound it
            raise VLLMValidationError(
                f"scoring a {len(ids):,}-token prompt with a memory (echo + logprobs) is above this "
                f"server's limit of {self._max_scoring_tokens:,} tokens (--max-scoring-tokens)",
                parameter="echo",
            )
        fused = False
        async for out in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
            if spec and not fused and out.prompt_logprobs:
                out.prompt_logprobs = await self._fuse(out.prompt_token_ids, out.prompt_logprobs, spec)
                fused = True
            yield out

    async def _fuse(self, prompt_ids: list[int], positions, parts: list[dict]) -> list:
        positions = list(positions)
        wanted = [list(p) if p else [] for p in positions]
        mems = []
        for part in parts:  # one prompt pass per decoder memory
            results = await self._engine.collective_rpc(
                "memserve_prompt_logprobs", args=(part["memory"], list(prompt_ids), float(part["temperature"]), self._base_width, wanted)
            )
            mems.append(results[0])
        fused_positions = []
        for i, pos in enumerate(positions):
            # a memory that is not finite at a position gives its share back to the base there (as in the sampler)
            live = [(mem[i], float(part["weight"])) for mem, part in zip(mems, parts) if mem[i] is not None]
            if not pos or not live:  # nothing to score, or no memory finite there: the base's
                fused_positions.append(pos)
                continue
            base = torch.tensor([lp.logprob for lp in pos.values()], dtype=torch.float64)
            if len(parts) == 1:
                values = mix(base, torch.tensor(live[0][0], dtype=torch.float64), live[0][1]).tolist()
            else:
                values = mix(base, [torch.tensor(m, dtype=torch.float64) for m, _ in live], [w for _, w in live]).tolist()
            fused_positions.append({t: Logprob(v, lp.rank, lp.decoded_token) for (t, lp), v in zip(pos.items(), values)})
        return fused_positions
