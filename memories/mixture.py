"""Scoring base + memory and base + kNN mixtures at the observed next tokens.

Evaluation needs the mixed probability of the *observed* token only, for many
λ values. ``memories.fuse.fuse`` is the single mixture formula; since it is
linear in probabilities, merging every non-target token into one "rest"
bucket leaves the target's fused probability unchanged, so we call ``fuse``
on two-bucket distributions instead of full vocabularies: the same formula,
about V/2 times less work per λ. (``tests/pipeline`` checks this equals the
full-vocabulary result.)
"""

from __future__ import annotations

import numpy as np
import torch

from memories.fuse import fuse
from memories.knn import knn_distribution

# Dense near 0: a memory that helps only a little still gets a λ that helps, not 0 or 0.05 by default.
LAMBDA_GRID = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# kNN-LM temperatures, as multiples of the typical spread of neighbour distances.
TEMPERATURE_FACTORS = tuple(2.0**e for e in range(-6, 4))
_FLOOR = -1e4  # keeps log(0) finite so fuse() never mistakes it for a forbidden token


def _two_buckets(logp_target: torch.Tensor) -> torch.Tensor:
    lp = logp_target.double().clamp(max=0.0)
    rest = torch.log(-torch.expm1(lp))  # log(1 - p)
    return torch.stack([lp.clamp(min=_FLOOR), rest.clamp(min=_FLOOR)], dim=-1)


def mix_at_targets(base_logp, other_logp, weight: float) -> torch.Tensor:
    """log((1-λ)·p_base(t) + λ·p_other(t)) per position, computed by ``fuse``."""
    base = _two_buckets(torch.as_tensor(np.asarray(base_logp)))
    other = _two_buckets(torch.as_tensor(np.asarray(other_logp)))
    return fuse(base, other, weight, 1.0)[..., 0]


def knn_logprob_at_targets(distances, values, labels, temperature: float, vocab_size: int, chunk: int = 1024) -> np.ndarray:
    """log p_kNN(observed token) per position (-inf where no neighbour stored it)."""
    out = np.empty(len(labels), dtype=np.float64)
    for s in range(0, len(labels), chunk):
        p = knn_distribution(distances[s : s + chunk], values[s : s + chunk], temperature, vocab_size)
        lab = torch.as_tensor(np.asarray(labels[s : s + chunk], dtype=np.int64))
        out[s : s + chunk] = torch.log(p.gather(1, lab[:, None])[:, 0].double()).numpy()
    return out


def distance_scale(distances: np.ndarray) -> float:
    """Typical spread between a query's nearest and farthest neighbour."""
    d = np.asarray(distances, dtype=np.float64)
    spread = np.median(d[:, -1] - d[:, 0]) if d.shape[1] > 1 else np.median(d[:, 0])
    return float(max(spread, 1e-6))
