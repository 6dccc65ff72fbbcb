"""The one fusion formula shared by serving, evaluation and the test oracle.

p(x) = (1 - λ) · p_base(x) + λ · p_mem(x),  p_mem = softmax(mem_logits / T_mem)

Computed in log space so that λ = 0, λ = 1 and very peaked distributions stay
finite and exact. Vocabulary widths may differ: the memory's distribution is
taken over the tokens both models share (the base's logits may be padded past
the tokenizer, or the memory may be narrower); tokens outside the memory get
the base's share only. Tokens the base forbids (-inf logits, e.g. from
``logit_bias`` or ``min_tokens`` applied before us) stay forbidden.
"""

from __future__ import annotations

import math

import torch


def fuse(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor,
    weight: float | torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Return fused log-probabilities with ``base_logits``' shape (``[..., V_base]``).

    ``weight`` and ``temperature`` are scalars or tensors broadcastable to
    ``[..., 1]`` (one value per row), so a batch of rows with different λ is
    one call.
    """
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    mem_logp = memory_logprobs(mem_logits, base_logits.shape[-1], temperature)
    missing = base_logp.shape[-1] - mem_logp.shape[-1]
    if missing:  # tokens the memory cannot emit: probability 0, so they keep the base's share only
        mem_logp = torch.nn.functional.pad(mem_logp, (0, missing), value=-math.inf)
    fused = mix(base_logp, mem_logp, weight)

    forbidden = torch.isneginf(base_logits)
    if forbidden.any():
        fused = torch.log_softmax(fused.masked_fill(forbidden, -math.inf), dim=-1)
    return fused


def mix(base_logp: torch.Tensor, mem_logp: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """log((1 - λ)·exp(base_logp) + λ·exp(mem_logp)) for already-normalised log-probabilities.

    ``fuse`` uses it on whole distributions; fused prompt logprobs use it on
    the few tokens vLLM reports per prompt position.
    """
    log_w, log_1mw = _log_weights(weight, base_logp)
    return torch.logaddexp(base_logp + log_1mw, mem_logp + log_w)


def memory_logprobs(mem_logits: torch.Tensor, base_width: int, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The memory's log-distribution over the tokens it shares with the base (see ``fuse``)."""
    mem = mem_logits[..., : min(base_width, mem_logits.shape[-1])].float()
    if isinstance(temperature, torch.Tensor):
        mem = mem / temperature.to(mem)
    elif temperature != 1.0:
        mem = mem / temperature
    return torch.log_softmax(mem, dim=-1)


def _log_weights(weight, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(λ) and log(1-λ), with log(0) = -inf (exact λ = 0 / λ = 1)."""
    w = torch.as_tensor(weight, dtype=torch.float64)
    if ((w < 0) | (w > 1) | torch.isnan(w)).any():
        raise ValueError(f"memory weight must be in [0, 1], got {weight!r}")
    log_w = torch.log(w).to(like.dtype).to(like.device)
    log_1mw = torch.log1p(-w).to(like.dtype).to(like.device)
    return log_w, log_1mw
