"""The correctness oracle: base and memory run separately in transformers, fused with ``fuse()``.

Slow on purpose (each step re-runs both models on the whole context): it
shares nothing with the serving path but the formula, so agreement between
the two is evidence that the engine integration is right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memories.fuse import fuse


@dataclass
class Continuation:
    tokens: list[int]
    logprobs: list[float]  # fused log-probability of each chosen token


class ReferenceFusion:
    """``memory_dir``: one decoder memory, or a list of them (a mixture: ``weight`` and ``temperature``
    are then lists of one per memory, and the fusion is ``fuse``'s K-memory formula).

    ``lora_dir``: the base runs with that PEFT adapter applied by PEFT itself (the oracle for lora memories).

    ``calm_dir``: the base runs composed with that calm memory through hooks on
    both transformers models (``memories.calm.hf``; the oracle for calm memories).
    Either may come with decoder memories fused on top of the changed base.
    """

    def __init__(self, base_dir: str, memory_dir: str | list[str] | None, lora_dir: str | None = None, calm_dir: str | None = None):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        if lora_dir:
            from peft import PeftModel

            self.base = PeftModel.from_pretrained(self.base, lora_dir).eval()
        self.mixture = isinstance(memory_dir, (list, tuple))
        dirs = list(memory_dir) if self.mixture else [memory_dir] if memory_dir else []
        self.memories = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in dirs]
        self.memory = self.memories[0] if self.memories and not self.mixture else None
        self.calm = None
        if calm_dir:
            from memories.calm.hf import load_calm

            self.calm = load_calm(calm_dir)

    def base_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The base's logits ``[B, T, V]`` (composed with the calm memory, if any)."""
        if self.calm is None:
            return self.base(ids).logits
        from memories.calm.hf import composed

        with composed(self.base, *self.calm):
            return self.base(ids).logits

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: list[int]) -> list[float]:
        """Log-probability of each prompt token after the ones before it (the base alone, or composed)."""
        logp = torch.log_softmax(self.base_logits(torch.tensor([prompt]))[0, :-1].float(), -1)
        return logp.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()

    @torch.inference_mode()
    def next_logprobs(self, context: list[int], weight: float | list[float], temperature: float | list[float] = 1.0) -> torch.Tensor:
        ids = torch.tensor([context])
        base_logits = self.base_logits(ids)[0, -1]
        if not self.memories:
            return torch.log_softmax(base_logits.float(), -1)
        if not self.mixture:
            return fuse(base_logits, self.memory(ids).logits[0, -1], weight, temperature)
        return fuse(base_logits, [m(ids).logits[0, -1] for m in self.memories], list(weight), temperature)

    def greedy(self, prompt: list[int], max_tokens: int, weight: float | list[float], temperature: float | list[float] = 1.0, stop: set[int] = frozenset()) -> Continuation:
        context, tokens, logprobs = list(prompt), [], []
        for _ in range(max_tokens):
            logp = self.next_logprobs(context, weight, temperature)
            token = int(torch.argmax(logp))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            if token in stop:
                break
            context.append(token)
        return Continuation(tokens, logprobs)
