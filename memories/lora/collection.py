"""One LoRA run on one domain, with checkpoints kept along the way as the generator's targets.

The LoRA (PEFT, on the projections named in ``modules`` of the top
``layers`` decoder layers) is trained with the causal-LM loss on windows of
the domain's train split. The frozen layers below it are run once per window
(``memories.lora.topstack``) and every step only runs the top of the model.
All runs share one seed, so every LoRA starts from the same ``lora_A``
initialisation: checkpoints of different domains then differ by what the
domain taught, not by a random start, which is what makes an average over
the collection (DnD's baseline) and a regression onto it meaningful.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("memserve.generator")


@dataclass(frozen=True)
class LoraRecipe:
    rank: int = 4
    alpha: float = 8.0
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: int = 6  # the top N decoder layers carry the LoRA
    steps: int = 30
    batch: int = 4  # windows per step
    window: int = 128  # tokens per training window
    lr: float = 2e-3
    warmup: int = 3
    checkpoint_from: int = 10  # first step whose weights are kept
    checkpoint_every: int = 1
    seed: int = 0
    bf16: bool = True  # autocast on the forward pass (fp32 LoRA weights and optimiser)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def layer_ids(self, total: int) -> list[int]:
        if not 1 <= self.layers <= total:
            raise ValueError(f"LoRA on the top {self.layers} layers: the base has {total}")
        return list(range(total - self.layers, total))

    def windows_needed(self) -> int:
        return self.steps * self.batch


def adapter_tensors(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's saved names (adapter name dropped)."""
    return {n.replace(".default", ""): p.detach().float().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def train_lora(base, windows: np.ndarray, states: torch.Tensor, recipe: LoraRecipe, progress: bool = True, label: str = "") -> dict:
    """Train on ``windows`` [n, T] (``states``: their cached states entering the first LoRA layer).

    Returns ``{"checkpoints": {key: [n_ckpt, ...]}, "steps": [...], "final": {key: tensor}, "losses": [...], "seconds"}``.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from memories.lora.topstack import num_layers, run_top

    started = time.time()
    total = num_layers(base)
    layer_ids = recipe.layer_ids(total)
    first = layer_ids[0]
    torch.manual_seed(recipe.seed)
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.modules), layers_to_transform=layer_ids, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng(recipe.seed)
    order = np.concatenate([rng.permutation(len(windows)) for _ in range(recipe.windows_needed() // max(1, len(windows)) + 1)])
    ids_all = torch.as_tensor(windows, dtype=torch.long)
    checkpoints: list[dict[str, torch.Tensor]] = []
    kept_steps, losses = [], []
    bar = tqdm(range(recipe.steps), desc=f"LoRA {label}".strip(), unit="step", disable=not progress, leave=False)
    model.train()
    for step in bar:
        idx = torch.as_tensor(order[step * recipe.batch : (step + 1) * recipe.batch])
        for g in opt.param_groups:
            g["lr"] = recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup))
        logits = run_top(model, first, states[idx], bf16=recipe.bf16)
        ids = ids_all[idx]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done >= recipe.checkpoint_from and (done - recipe.checkpoint_from) % recipe.checkpoint_every == 0:
            checkpoints.append(adapter_tensors(model))
            kept_steps.append(done)
    final = adapter_tensors(model)
    if not checkpoints or kept_steps[-1] != recipe.steps:
        checkpoints.append(final)
        kept_steps.append(recipe.steps)
    stacked = {k: torch.stack([c[k] for c in checkpoints]) for k in final}
    seconds = time.time() - started
    log.info("LoRA %s: %d steps, loss %.3f → %.3f (mean of first/last 3), %d checkpoints, %.1fs", label, recipe.steps, np.mean(losses[:3]), np.mean(losses[-3:]), len(kept_steps), seconds)
    return {"checkpoints": stacked, "steps": kept_steps, "final": final, "losses": losses, "seconds": seconds}
