"""Training the memory: a small causal LM that imitates the kNN retriever.

The memory has the base's architecture and tokenizer, with fewer layers, and
starts from the base (embeddings, final norm, LM head and the first N decoder
layers copied), so it begins as a truncated base rather than from noise. The
loss is the paper's

    β · KL(p_kNN ‖ p_mem) + (1 − β) · CE(next token)

with p_kNN the sparse stored targets. AdamW, linear warm-up then cosine decay,
gradient accumulation over windows, and a checkpoint after every epoch (model,
optimiser, scheduler) from which a killed run resumes.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memories.windows import iter_windows


def init_memory(base_dir, layers: int):
    """The base truncated to its first ``layers`` decoder layers (same config otherwise)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    total = config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"memory layers must be in 1..{total} (the base's depth), got {layers}")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    memory = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in base.state_dict().items() if not _layer_at_or_above(k, layers)}
    missing, unexpected = memory.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"memory init from base failed: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        memory.tie_weights()
    return memory


def _layer_at_or_above(key: str, n: int) -> bool:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= n
    return False


def memory_loss(logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor, beta: float) -> tuple[torch.Tensor, float, float]:
    """(loss, kl, ce) for one window's scored positions; targets are sparse [n, top]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    ce = -logq.gather(1, labels[:, None]).squeeze(1).mean()
    p = target_probs.float()
    logp = torch.where(p > 0, torch.log(p.clamp(min=1e-30)), torch.zeros_like(p))
    kl = (p * (logp - logq.gather(1, target_ids.long()))).sum(-1).mean()
    return beta * kl + (1 - beta) * ce, kl.item(), ce.item()


def _schedule(total_steps: int, warmup: float):
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_memory(base_dir, tokens: np.ndarray, target_ids, target_probs, out: Path, ckpt_dir: Path, *, layers: int, context: int, stride: int, epochs: int, lr: float, beta: float, accumulate: int, warmup: float, weight_decay: float, seed: int, progress=True, frozen_embeddings: bool = False) -> dict:
    """Train and save the memory as an HF directory in ``out``; checkpoints go to ``ckpt_dir``.

    ``frozen_embeddings``: the token embedding and head stay the base's (a thin memory, which
    the server runs on the base's own tensors); they are still saved here, for evaluation.
    """
    torch.manual_seed(seed)
    model = init_memory(base_dir, layers)
    if frozen_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    model.train()
    windows = list(iter_windows(len(tokens), context, stride))
    steps_per_epoch = math.ceil(len(windows) / accumulate)
    total = steps_per_epoch * epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, warmup))
    history: list[dict] = []
    start_epoch = 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = torch.load(latest, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    for epoch in range(start_epoch, epochs):
        order = list(range(len(windows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "tokens": 0}
        bar = tqdm(total=len(order), desc=f"train epoch {epoch + 1}/{epochs}", unit="win", disable=not progress)
        for i, wi in enumerate(order):
            w = windows[wi]
            ids = torch.as_tensor(tokens[w.begin : w.end], dtype=torch.long)[None]
            labels = torch.as_tensor(tokens[w.first + 1 : w.end + 1], dtype=torch.long)
            t_ids = torch.from_numpy(np.array(target_ids[w.first : w.end]))
            t_probs = torch.from_numpy(np.array(target_probs[w.first : w.end]))
            logits = model(input_ids=ids).logits[0, w.offset :]
            loss, kl, ce = memory_loss(logits, labels, t_ids, t_probs, beta)
            (loss * (w.scored / context) / accumulate).backward()
            n = w.scored
            sums["loss"] += loss.item() * n
            sums["kl"] += kl * n
            sums["ce"] += ce * n
            sums["tokens"] += n
            if (i + 1) % accumulate == 0 or i + 1 == len(order):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{sums['loss'] / sums['tokens']:.3f}")
        bar.close()
        history.append({"epoch": epoch + 1, **{k: sums[k] / max(1, sums["tokens"]) for k in ("loss", "kl", "ce")}})
        _save_checkpoint(ckpt_dir, epoch, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "history": history})
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps({"epochs": history}, indent=2))
    return {"epochs": epochs, "history": history, "windows": len(windows), "steps": total}


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def _save_checkpoint(ckpt_dir: Path, epoch: int, state: dict) -> None:
    tmp = ckpt_dir / f".epoch-{epoch}.pt.partial"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / f"epoch-{epoch}.pt")
    for old in ckpt_dir.glob("epoch-*.pt"):  # one checkpoint is enough to resume
        if old.name != f"epoch-{epoch}.pt":
            old.unlink(missing_ok=True)
