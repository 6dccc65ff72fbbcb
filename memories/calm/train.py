"""Training a composition: both models frozen, only the cross-attention connections learn.

The data is a stack of equal-length token windows with, per position, the
next token and a 0/1 weight saying whether that position counts (positions
already scored by an earlier window, padding, and — for prompt/completion
corpora — prompt tokens weigh 0). ``windows_from_stream`` cuts a corpus
stream exactly as evaluation does (``memories.windows``); ``windows_from_sequences``
takes any in-memory list of token lists, right-padded: with causal attention in
both models and in the composition, padding after a sequence never changes
what its real positions see, so no attention mask is needed.

The loss is the mean cross-entropy over the counted positions of a batch.
AdamW over the composition's parameters only, linear warm-up then cosine
decay. A checkpoint (composition, optimiser, scheduler, loss log) is written
every ``checkpoint_every`` steps and at the end of every epoch; a killed run
resumes from the last one at the very step it reached, since the window order
of each epoch is a function of the seed.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memories.calm.composition import Composition
from memories.calm.hf import composed
from memories.training import lr_schedule
from memories.windows import iter_windows

log = logging.getLogger("memserve.compose")


@dataclass(frozen=True)
class TrainingWindows:
    """``ids[i]`` is fed to the models; ``labels[i, t]`` is the token after ``ids[i, t]``; ``weights[i, t]`` in {0, 1}."""

    ids: torch.Tensor  # [N, L] int64
    labels: torch.Tensor  # [N, L] int64
    weights: torch.Tensor  # [N, L] float32

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def counted(self) -> int:
        return int(self.weights.sum().item())


def windows_from_stream(stream: np.ndarray, context: int, stride: int, token_mask: np.ndarray | None = None) -> TrainingWindows:
    """The evaluation cut of a stream (each position counted once); ``token_mask[j]`` false: token j is never a target."""
    stream = np.asarray(stream, dtype=np.int64)
    windows = list(iter_windows(len(stream), context, stride))
    if not windows:
        raise ValueError(f"a stream of {len(stream)} tokens has no position to train on")
    length = windows[0].end - windows[0].begin  # every window of one stream has this length (memories.windows)
    ids = np.zeros((len(windows), length), np.int64)
    labels = np.zeros_like(ids)
    weights = np.zeros(ids.shape, np.float32)
    for i, w in enumerate(windows):
        n = w.end - w.begin
        ids[i, :n] = stream[w.begin : w.end]
        labels[i, :n] = stream[w.begin + 1 : w.end + 1]
        weights[i, w.offset : n] = 1.0
        if token_mask is not None:
            weights[i, :n] *= np.asarray(token_mask[w.begin + 1 : w.end + 1], dtype=np.float32)
    return TrainingWindows(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(weights))


def windows_from_sequences(sequences, masks=None, pad_id: int = 0) -> TrainingWindows:
    """Token lists (each ≥ 2 tokens) as right-padded windows; ``masks[i][j]`` false: token j of sequence i is not a target."""
    seqs = [list(map(int, s)) for s in sequences]
    if not seqs or min(len(s) for s in seqs) < 2:
        raise ValueError("need at least one sequence, each of at least 2 tokens")
    length = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, pad_id)
    weights = torch.zeros(ids.shape, dtype=torch.float32)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        ids[i, :n] = torch.tensor(s[:-1])
        labels[i, :n] = torch.tensor(s[1:])
        weights[i, :n] = 1.0 if masks is None else torch.tensor([float(bool(m)) for m in masks[i][1:]])
    return TrainingWindows(ids, labels, weights)


def batch_loss(base, windows: TrainingWindows, rows, device) -> tuple[torch.Tensor, float]:
    """(mean cross-entropy over counted positions, their number) for rows of ``windows``; ``base`` as it is called."""
    rows = torch.as_tensor(rows)
    ids = windows.ids[rows].to(device)
    labels = windows.labels[rows].to(device)
    weights = windows.weights[rows].to(device)
    logits = base(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(weights)
    n = weights.sum()
    return (nll * weights).sum() / n.clamp(min=1.0), float(n.item())


@torch.no_grad()
def composed_loss(base, augment, composition: Composition, windows: TrainingWindows, batch: int = 4) -> float:
    """Mean cross-entropy of the composition over every counted position (the base's own when the gates are 0)."""
    device = next(base.parameters()).device
    total = count = 0.0
    with composed(base, augment, composition):
        for s in range(0, len(windows), batch):
            rows = list(range(s, min(s + batch, len(windows))))
            loss, n = batch_loss(base, windows, rows, device)
            total, count = total + loss.item() * n, count + n
    return total / max(count, 1.0)


def parameter_groups(composition: Composition, lr: float, gate_lr: float | None, weight_decay: float) -> list[dict]:
    """Projection matrices (with weight decay), norm scales, and the gates (at ``gate_lr``; None: ``lr``).

    Adam moves every parameter by about its learning rate per step whatever its
    scale: the matrices' entries start near 1/sqrt(width), but a gate's useful
    range is 0..1, so at one shared rate the gates open last and a short run
    barely changes the base. A larger ``gate_lr`` lets them open at the pace the
    matrices learn.
    """
    named = list(composition.named_parameters())
    gates = [p for n, p in named if n.endswith("gate")]
    matrices = [p for n, p in named if p.ndim >= 2]
    scales = [p for n, p in named if p.ndim < 2 and not n.endswith("gate")]
    return [
        {"params": matrices, "weight_decay": weight_decay, "lr": lr},
        {"params": scales, "weight_decay": 0.0, "lr": lr},
        {"params": gates, "weight_decay": 0.0, "lr": gate_lr if gate_lr is not None else lr},
    ]


def freeze(*models) -> None:
    """The base and the augmenting model never change: no gradients for their weights, eval mode (no dropout)."""
    for m in models:
        m.requires_grad_(False)
        m.eval()


def train_composition(
    base,
    augment,
    composition: Composition,
    windows: TrainingWindows,
    *,
    epochs: int = 1,
    lr: float = 3e-3,
    gate_lr: float | None = 0.1,
    batch: int = 4,
    warmup: float = 0.05,
    weight_decay: float = 0.0,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 50,
    validation: TrainingWindows | None = None,
    progress: bool = True,
) -> dict:
    """Train ``composition`` in place; returns the loss log and sizes.

    ``history``: one entry per optimiser step (``step``, ``epoch``, ``loss``, ``lr``);
    ``validation``: composed loss on ``validation`` before training (= the base's)
    and after every epoch.
    """
    if len(windows) == 0 or windows.counted == 0:
        raise ValueError("no position to train on (every weight is 0)")
    freeze(base, augment)
    device = next(base.parameters()).device
    composition.to(device).train()
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(windows) / batch)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(parameter_groups(composition, lr, gate_lr, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, warmup))
    history: list[dict] = []
    val_log: list[dict] = []
    step = 0
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is not None:
        state = torch.load(latest, map_location=device, weights_only=False)
        composition.load_state_dict(state["composition"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history, val_log = state["step"], state["history"], state["validation"]
        log.info("train: resumed from %s (step %d of %d)", latest.name, step, total)
    if validation is not None and not val_log:
        val_log.append({"epoch": 0, "loss": composed_loss(base, augment, composition, validation, batch)})

    def save() -> None:
        if checkpoint_dir is not None:
            state = {"composition": composition.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "history": history, "validation": val_log}
            save_checkpoint(checkpoint_dir, step, state)

    bar = tqdm(total=total, initial=step, desc="compose: train", unit="step", disable=not progress)
    with composed(base, augment, composition):
        while step < total:
            epoch, within = divmod(step, steps_per_epoch)
            order = list(range(len(windows)))
            random.Random(seed * 1000 + epoch).shuffle(order)
            rows = order[within * batch : (within + 1) * batch]
            loss, n = batch_loss(base, windows, rows, device)
            if n > 0:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(composition.parameters(), 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": step + 1, "epoch": epoch + 1, "loss": loss.item(), "positions": n, "lr": sched.get_last_lr()[0]})
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch and validation is not None:
                val_log.append({"epoch": step // steps_per_epoch, "loss": composed_loss(base, augment, composition, validation, batch)})
                composition.train()
                log.info("train epoch %d: validation loss %.4f (before training %.4f)", val_log[-1]["epoch"], val_log[-1]["loss"], val_log[0]["loss"])
            if end_of_epoch or step % max(1, checkpoint_every) == 0:
                save()
    bar.close()
    composition.eval()
    return {"epochs": epochs, "steps": total, "windows": len(windows), "positions": windows.counted, "history": history, "validation": val_log}


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(Path(ckpt_dir).glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(ckpt_dir: Path, step: int, state: dict) -> None:
    """Write-then-rename; older checkpoints go once the new one is in place (one is enough to resume)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".step-{step}.pt.partial"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / f"step-{step}.pt")
    for old in ckpt_dir.glob("step-*.pt"):
        if old.name != f"step-{step}.pt":
            old.unlink(missing_ok=True)
