"""Training the memory: a small causal LM that imitates the kNN retriever.

The memory has the base's architecture and tokenizer and starts from the
base's weights: by default all of them (the paper's memories are whole
pretrained small LMs), or a cut to N decoder layers (``memory_layer_ids``).
The loss is the paper's

    β · KL(p_kNN ‖ p_mem) + (1 − β) · CE(next token)

with p_kNN the sparse stored targets. AdamW, linear warm-up then cosine decay,
gradient accumulation over windows, and a checkpoint after every epoch (model,
optimiser, scheduler) from which a killed run resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memories.distributed import World, all_sum, barrier
from memories.distributed import world as dist_world
from memories.windows import iter_windows
from memories.training import init_memory, lr_schedule

log = logging.getLogger("memserve.memory")


def memory_loss(logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor, beta: float) -> tuple[torch.Tensor, float, float]:
    """(loss, kl, ce) for one window's scored positions; targets are sparse [n, top]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    ce = -logq.gather(1, labels[:, None]).squeeze(1).mean()
    p = target_probs.float()
    logp = torch.where(p > 0, torch.log(p.clamp(min=1e-30)), torch.zeros_like(p))
    kl = (p * (logp - logq.gather(1, target_ids.long()))).sum(-1).mean()
    return beta * kl + (1 - beta) * ce, kl.item(), ce.item()


@torch.no_grad()
def heldout_fit(model, tokens: np.ndarray, target_ids, target_probs, context: int, stride: int, world: World = World()) -> dict:
    """How well the memory imitates the retriever on text it never trained on:
    mean KL(p_kNN ‖ p_mem) over a held-out split's positions, and the memory's own perplexity there.
    Each process scores its share of the windows; the sums are added over processes."""
    was_training = model.training
    model.eval()
    kl_sum = nll_sum = n = 0.0
    windows = list(iter_windows(len(tokens), context, stride))
    for w in windows[world.rank :: world.size]:
        logits, labels, t_ids, t_probs = _window_batch(model, tokens, target_ids, target_probs, w, world.device)
        _, kl, ce = memory_loss(logits, labels, t_ids, t_probs, 0.5)
        kl_sum, nll_sum, n = kl_sum + kl * w.scored, nll_sum + ce * w.scored, n + w.scored
    kl_sum, nll_sum, n = all_sum([kl_sum, nll_sum, n], world.device)
    model.train(was_training)
    return {"kl": kl_sum / n, "ppl": math.exp(nll_sum / n)}


def _window_batch(model, tokens, target_ids, target_probs, w, device):
    """The memory's logits at a window's scored positions, with their labels and kNN targets."""
    ids = torch.as_tensor(tokens[w.begin : w.end], dtype=torch.long, device=device)[None]
    labels = torch.as_tensor(tokens[w.first + 1 : w.end + 1], dtype=torch.long, device=device)
    t_ids = torch.from_numpy(np.array(target_ids[w.first : w.end])).to(device)
    t_probs = torch.from_numpy(np.array(target_probs[w.first : w.end])).to(device)
    return model(input_ids=ids).logits[0, w.offset :], labels, t_ids, t_probs


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively here (AVX512-BF16 or AMX on CPU, bf16 on GPU);
    elsewhere autocast would emulate them and be slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_memory(base_dir, tokens: np.ndarray, target_ids, target_probs, out: Path | None, ckpt_dir: Path, *, layers: int, init: str, context: int, stride: int, epochs: int, lr: float, beta: float, accumulate: int, warmup: float, weight_decay: float, seed: int, bf16: bool = False, heldout=None, progress=True, frozen_embeddings: bool = False) -> dict:
    """Train and save the memory as an HF directory in ``out``; checkpoints go to ``ckpt_dir``.

    ``heldout``: (tokens, target ids, target probs) of the validation split; the
    fit to its kNN distribution is measured before training and after every epoch
    (in fp32). ``bf16``: training forward passes under bf16 autocast where the
    hardware has native bf16 (``native_bf16``), fp32 weights and optimiser.

    Under torchrun the model is wrapped in DistributedDataParallel: every
    optimiser step takes the same ``accumulate`` windows as a single process
    would, dealt round-robin to the processes, and each window's loss is scaled
    so that DDP's gradient average equals the single-process gradient sum.
    Only rank 0 writes checkpoints and ``out`` (``out`` is None elsewhere).
    ``frozen_embeddings``: the token embedding and head stay the base's (a thin memory, which
    the server runs on the base's own tensors); they are still saved here, for evaluation.
    """
    world = dist_world()
    torch.manual_seed(seed)
    model = init_memory(base_dir, layers, init).to(world.device)
    if frozen_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
    use_bf16 = bf16 and native_bf16(world.device)
    windows = list(iter_windows(len(tokens), context, stride))
    steps_per_epoch = math.ceil(len(windows) / accumulate)
    total = steps_per_epoch * epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, warmup))
    history: list[dict] = []
    start_epoch = 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = torch.load(latest, map_location=world.device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    elif heldout is not None:
        history.append({"epoch": 0, **_prefixed("heldout_", heldout_fit(model, *heldout, context, stride, world))})
        _log_epoch(history[-1])
    for epoch in range(start_epoch, epochs):
        order = list(range(len(windows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, kl, ce (each × tokens), tokens
        bar = tqdm(total=steps_per_epoch, desc=f"train epoch {epoch + 1}/{epochs}", unit="step", disable=not (progress and world.main))
        for s in range(0, len(order), accumulate):
            mine = order[s : s + accumulate][world.rank :: world.size]
            for j, wi in enumerate(mine or [None]):
                sync = j == max(1, len(mine)) - 1 or world.size == 1
                with contextlib.nullcontext() if sync else net.no_sync():
                    if wi is None:  # fewer windows than processes in this step: join the gradient average with zeros
                        net(input_ids=torch.zeros((1, 1), dtype=torch.long, device=world.device)).logits.sum().mul(0.0).backward()
                        continue
                    w = windows[wi]
                    with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        logits, labels, t_ids, t_probs = _window_batch(net, tokens, target_ids, target_probs, w, world.device)
                    loss, kl, ce = memory_loss(logits, labels, t_ids, t_probs, beta)
                    (loss * (w.scored / context) * world.size / accumulate).backward()
                for i, v in enumerate((loss.item(), kl, ce)):
                    sums[i] += v * w.scored
                sums[3] += w.scored
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
        bar.close()
        loss_sum, kl_sum, ce_sum, n = all_sum(sums, world.device)
        record = {"epoch": epoch + 1, "loss": loss_sum / n, "kl": kl_sum / n, "ce": ce_sum / n}
        if heldout is not None:
            record.update(_prefixed("heldout_", heldout_fit(model, *heldout, context, stride, world)))
        history.append(record)
        _log_epoch(record)
        if world.main:
            _save_checkpoint(ckpt_dir, epoch, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "history": history})
        barrier()
    model.eval()
    if out is not None:
        model.save_pretrained(out, safe_serialization=True)
        (out / "train_log.json").write_text(json.dumps({"epochs": history}, indent=2))
    return {"epochs": epochs, "history": history, "windows": len(windows), "steps": total, "processes": world.size, "bf16": use_bf16}


def _prefixed(prefix: str, d: dict) -> dict:
    return {prefix + k: v for k, v in d.items()}


def _log_epoch(r: dict) -> None:
    parts = [f"{k} {r[k]:.4g}" for k in ("loss", "kl", "ce") if k in r]
    if "heldout_kl" in r:
        parts.append(f"validation: KL(kNN‖memory) {r['heldout_kl']:.4f}, memory-alone ppl {r['heldout_ppl']:.2f}")
    log.info("train epoch %d: %s", r["epoch"], "; ".join(parts))


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
