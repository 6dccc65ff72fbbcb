"""The one perplexity formula: exp of the mean negative log-likelihood per token.

Evaluation, tests and the server's reporting all call these two functions so
that "perplexity" means the same number everywhere (natural log, every
scored token weighted equally, no special treatment of document ends).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of ``logits`` (``[..., V]``) and ``targets`` (``[...]``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def perplexity(logprobs) -> float:
    """exp(-mean log p) over all tokens given (tensor, array or list)."""
    lp = torch.as_tensor(np.asarray(logprobs, dtype=np.float64) if not isinstance(logprobs, torch.Tensor) else logprobs).double()
    if lp.numel() == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    nll = -lp.mean().item()
    return math.exp(nll) if nll < 700 else math.inf
