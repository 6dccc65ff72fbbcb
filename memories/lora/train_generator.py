"""Training the hyper-convolutional generator on the LoRA collection.

A sample pairs one checkpoint of one training domain with a random batch of
that domain's prompt windows (their cached per-token encoder states), as in
DnD; the loss is the MSE between the generator's output and the
checkpoint's standardised weight tokens, on real (non-padding) positions
only. Prompt states are standardised per feature with statistics of the
training prompts (a few features of a small LM's residual stream are
thousands of times larger than the rest), kept with the generator.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from memories.lora.hyperconv import HyperConvConfig, HyperConvDecoder
from memories.lora.weights import Layout, Standardiser

log = logging.getLogger("memserve.generator")


@dataclass(frozen=True)
class GeneratorRecipe:
    prompts: int = 16  # P: prompt windows per sample (and per generation)
    prompt_tokens: int = 64  # T
    steps: int = 600
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 30
    dropout: float = 0.1
    seed: int = 0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real positions of the grid only."""
    m = mask.to(pred.dtype).expand_as(pred)
    return ((pred - target).pow(2) * m).sum() / m.sum().clamp(min=1)


@dataclass
class InputNorm:
    mean: torch.Tensor  # [H]
    scale: torch.Tensor  # [H]

    @classmethod
    def fit(cls, states: list[torch.Tensor]) -> "InputNorm":
        flat = torch.cat([s.reshape(-1, s.shape[-1]).double() for s in states])
        return cls(flat.mean(0).float(), flat.std(0).clamp(min=1e-6).float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input.mean": self.mean.contiguous(), "input.scale": self.scale.contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "InputNorm":
        return cls(t["input.mean"].float(), t["input.scale"].float())


def train_generator(layout: Layout, collection: list[dict], recipe: GeneratorRecipe, progress: bool = True) -> dict:
    """``collection``: per training domain ``{"grids": [n_ckpt, tokens, token_dim], "prompts": [n_win, T', H]}``.

    Returns the model, its standardisers, config and the loss history.
    """
    from tqdm import tqdm

    started = time.time()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    mask = layout.mask()
    standard = Standardiser.fit(torch.cat([c["grids"] for c in collection]), mask)
    targets = [standard.apply(c["grids"]) * mask for c in collection]
    prompts = [c["prompts"][:, : recipe.prompt_tokens].float() for c in collection]
    if any(p.shape[1] < recipe.prompt_tokens for p in prompts):
        raise ValueError(f"prompt windows are shorter than prompt_tokens={recipe.prompt_tokens}")
    norm = InputNorm.fit(prompts)
    prompts = [norm(p) for p in prompts]
    cfg = HyperConvConfig(prompts=recipe.prompts, prompt_tokens=recipe.prompt_tokens, hidden=prompts[0].shape[-1], tokens=layout.tokens, token_dim=layout.token_dim, dropout=recipe.dropout)
    model = HyperConvDecoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * frac))

    def sample():
        xs, ys = [], []
        for _ in range(recipe.batch):
            d = int(rng.integers(len(collection)))
            c = int(rng.integers(len(targets[d])))
            n = len(prompts[d])
            pick = rng.choice(n, recipe.prompts, replace=n < recipe.prompts)
            xs.append(prompts[d][pick])
            ys.append(targets[d][c])
        return torch.stack(xs), torch.stack(ys)

    history = []
    model.train()
    bar = tqdm(range(recipe.steps), desc="generator", unit="step", disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = sample()
        loss = masked_mse(model(x), y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(round(loss.item(), 6))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}")
    model.eval()
    first, last = float(np.mean(history[: min(20, len(history))])), float(np.mean(history[-min(20, len(history)) :]))
    log.info("generator: %d steps, MSE %.4f → %.4f (standardised units; mean of first/last 20), %.1fs", recipe.steps, first, last, time.time() - started)
    return {"model": model, "standardiser": standard, "input_norm": norm, "config": cfg, "history": history, "recipe": asdict(recipe), "seconds": time.time() - started}
