"""The one perplexity formula: exp of the mean negative log-likelihood per token, and a model's log-likelihoods over a stream.

Evaluation, tests and the server's reporting all call these two functions so
that "perplexity" means the same number everywhere (natural log, every
scored token weighted equally, no special treatment of document ends).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from memories.windows import iter_windows


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


def scored_windows(tokens: np.ndarray, context: int, stride: int, desc: str, progress: bool = True, device=None):
    """For each window of a stream: its input ids ``[1, T]``, the offset of its first scored position, and the
    next tokens of its scored positions (every position of the stream scored once, with the longest context)."""
    for w in tqdm(list(iter_windows(len(tokens), context, stride)), desc=desc, unit="win", disable=not progress):
        ids = torch.as_tensor(tokens[w.begin : w.end], dtype=torch.long, device=device)[None]
        yield ids, w.offset, torch.as_tensor(tokens[w.first + 1 : w.end + 1], dtype=torch.long, device=device)


@torch.inference_mode()
def model_logprobs(model, tokens: np.ndarray, context: int, stride: int, desc: str, temperatures=(1.0,), progress=True) -> dict[float, np.ndarray]:
    """log softmax(logits / T)(observed next token) at every position of a stream, per T."""
    out: dict[float, list] = {t: [] for t in temperatures}
    for ids, offset, labels in scored_windows(tokens, context, stride, desc, progress, model.device):
        logits = model(input_ids=ids).logits[0, offset:]
        for t in temperatures:
            out[t].append(token_logprobs(logits / t, labels).cpu().numpy())
    return {t: np.concatenate(v) for t, v in out.items()}
