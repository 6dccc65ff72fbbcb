"""The one fusion formula shared by serving, evaluation and the test oracle.

p(x) = (1 - Σλᵢ) · p_base(x) + Σ λᵢ · p_memᵢ(x),  p_memᵢ = softmax(mem_logitsᵢ / T_memᵢ)

One memory (K = 1) is the common case, p = (1 - λ) · p_base + λ · p_mem; a
request may fuse several decoder memories at once (a mixture, K ≥ 2), each
with its own weight and temperature, the weights summing to at most 1.

Computed in log space so that λ = 0, λ = 1 (Σλᵢ = 1) and very peaked
distributions stay finite and exact: one memory is ``logaddexp(log(1-λ) +
log p_base, log λ + log p_mem)``, several are the ``logsumexp`` of
``log(1-Σλᵢ) + log p_base`` and every ``log λᵢ + log p_memᵢ``. Vocabulary
widths may differ: each memory's distribution is taken over the tokens it
shares with the base (the base's logits may be padded past the tokenizer, or
the memory may be narrower); tokens outside a memory get no share of its
weight. Tokens the base forbids (-inf logits, e.g. from ``logit_bias`` or
``min_tokens`` applied before us) stay forbidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# a sum of weights this far above 1 is rounding (0.1 + 0.2 + 0.7 = 1.0000000000000002): it counts as 1
WEIGHT_SUM_TOLERANCE = 1e-9


def fuse(
    base_logits: torch.Tensor,
    mem_logits: torch.Tensor | Sequence[torch.Tensor],
    weight: float | torch.Tensor | Sequence[float | torch.Tensor],
    temperature: float | torch.Tensor | Sequence[float | torch.Tensor] = 1.0,
) -> torch.Tensor:
    """Return fused log-probabilities with ``base_logits``' shape (``[..., V_base]``).

    One memory: ``mem_logits`` a tensor, ``weight`` and ``temperature`` scalars
    or tensors broadcastable to ``[..., 1]`` (one value per row), so a batch of
    rows with different λ is one call. Several memories (a mixture):
    ``mem_logits`` a list of K tensors and ``weight`` a list of K weights (each
    as above; their sum at most 1), ``temperature`` a list of K or one for all.
    """
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    width = base_logp.shape[-1]
    if isinstance(mem_logits, torch.Tensor):
        fused = mix(base_logp, _padded(memory_logprobs(mem_logits, width, temperature), width), weight)
    else:
        temperatures = list(temperature) if isinstance(temperature, Sequence) else [temperature] * len(mem_logits)
        if len(temperatures) != len(mem_logits):
            raise ValueError(f"{len(mem_logits)} memories but {len(temperatures)} temperatures")
        mems = [_padded(memory_logprobs(m, width, t), width) for m, t in zip(mem_logits, temperatures)]
        fused = mix(base_logp, mems, weight)

    # rows with a forbidden token are renormalised without it; the others are returned as computed, bit for bit
    # (both are computed, so that no host read of the mask decides: on a GPU that read would wait for the step)
    forbidden = torch.isneginf(base_logits)
    renormalised = torch.log_softmax(fused.masked_fill(forbidden, -math.inf), dim=-1)
    return torch.where(forbidden.any(dim=-1, keepdim=True), renormalised, fused)


def mix(
    base_logp: torch.Tensor,
    mem_logp: torch.Tensor | Sequence[torch.Tensor],
    weight: float | torch.Tensor | Sequence[float | torch.Tensor],
) -> torch.Tensor:
    """log((1 - Σλᵢ)·exp(base_logp) + Σ λᵢ·exp(mem_logpᵢ)) for already-normalised log-probabilities.

    One memory: ``mem_logp`` a tensor and ``weight`` one weight (scalar or per
    row). Several: lists of K of each. ``fuse`` uses it on whole distributions;
    fused prompt logprobs use it on the few tokens vLLM reports per prompt position.
    """
    if isinstance(mem_logp, torch.Tensor):
        log_w, log_1mw = _log_weights(weight, base_logp)
        return torch.logaddexp(base_logp + log_1mw, mem_logp + log_w)
    weights = list(weight) if isinstance(weight, Sequence) else None
    if weights is None or len(weights) != len(mem_logp) or not weights:
        raise ValueError(f"a mixture needs one weight per memory: {len(mem_logp)} memories, weights {weight!r}")
    log_ws, log_rest = _log_mixture_weights(weights, base_logp)
    terms = [base_logp + log_rest, *(m + lw for m, lw in zip(mem_logp, log_ws))]
    return torch.logsumexp(torch.stack(torch.broadcast_tensors(*terms)), dim=0)


def memory_logprobs(mem_logits: torch.Tensor, base_width: int, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The memory's log-distribution over the tokens it shares with the base (see ``fuse``)."""
    mem = mem_logits[..., : min(base_width, mem_logits.shape[-1])].float()
    if isinstance(temperature, torch.Tensor):
        mem = mem / temperature.to(mem)
    elif temperature != 1.0:
        mem = mem / temperature
    return torch.log_softmax(mem, dim=-1)


def check_weights(weights: Sequence[float]) -> None:
    """Raise ``ValueError`` unless every weight is in [0, 1] and they sum to at most 1 (what ``mix`` accepts)."""
    _log_mixture_weights([float(w) for w in weights], torch.zeros(()))


def _padded(mem_logp: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mem_logp.shape[-1]
    if missing:  # tokens the memory cannot emit: probability 0, so they keep the base's share only
        mem_logp = torch.nn.functional.pad(mem_logp, (0, missing), value=-math.inf)
    return mem_logp


def _check_range(w: torch.Tensor, weight) -> None:
    if ((w < 0) | (w > 1) | torch.isnan(w)).any():
        raise ValueError(f"memory weight must be in [0, 1], got {weight!r}")


def _log_weights(weight, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(λ) and log(1-λ), with log(0) = -inf (exact λ = 0 / λ = 1).

    Numbers are checked here; a tensor of weights is the caller's to check (the
    server validates each request's weights before they reach the engine), since
    reading it back would wait for the device.
    """
    w = torch.as_tensor(weight, dtype=torch.float64)
    if not isinstance(weight, torch.Tensor):
        _check_range(w, weight)
    log_w = torch.log(w).to(like.dtype).to(like.device)
    log_1mw = torch.log1p(-w).to(like.dtype).to(like.device)
    return log_w, log_1mw


def _log_mixture_weights(weights: list, like: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """log(λᵢ) for each memory and log(1 - Σλᵢ), with log(0) = -inf (exact Σλᵢ = 1)."""
    ws = [torch.as_tensor(w, dtype=torch.float64) for w in weights]
    checked = not any(isinstance(w, torch.Tensor) for w in weights)  # tensors: the caller's to check (see _log_weights)
    for w, given in zip(ws, weights):
        if checked:
            _check_range(w, given)
    total = sum(ws[1:], ws[0])
    if checked and (total > 1 + WEIGHT_SUM_TOLERANCE).any():
        raise ValueError(f"memory weights must sum to at most 1, got {[w.tolist() for w in ws]!r} (sum {total.max().item():.6g})")
    convert = lambda t: t.to(like.dtype).to(like.device)  # noqa: E731
    return [convert(torch.log(w)) for w in ws], convert(torch.log1p(-total.clamp(max=1.0)))
