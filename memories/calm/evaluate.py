"""Evaluation of a composition: test perplexity of base, augmenting model, composition, base + decoder memory.

Every system scores the same positions of the test stream with the same
windows through ``memories.decoder.evaluate.model_logprobs`` and ``memories.perplexity``
(the functions a decoder build's evaluation uses), so the base's number here
equals the ``test_ppl_base`` of a decoder memory built from the same corpus
with the same ``--eval-tokens``, ``--context`` and ``--stride``. A decoder
memory is fused at its own λ and temperature (``memory.json``) exactly as a
decoder build reports ``test_ppl_memory``: ``memories.mixture.mix_at_targets``,
i.e. ``memories.fuse``. For prompt/completion corpora only completion
positions count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from memories.artifact import MEMORY_JSON, check_compatible, read_card
from memories.calm.composition import Composition
from memories.calm.hf import composed
from memories.decoder.evaluate import load_memory_model
from memories.perplexity import model_logprobs
from memories.mixture import mix_at_targets
from memories.perplexity import perplexity

log = logging.getLogger("memserve.compose")

SYSTEMS = ("base", "augment", "composition", "decoder_memory")
LABELS = {"base": "base alone", "augment": "augmenting model alone", "composition": "base ⊕ augment (CALM)", "decoder_memory": "base + decoder memory (fused)"}


def load_decoder_memory(path: str | Path, base, base_tokenizer):
    """A decoder memory checked as the server checks it, as a transformers model, with its λ and T."""
    card = read_card(path, Path(path).name)
    meta = json.loads((Path(path) / MEMORY_JSON).read_text()) if (Path(path) / MEMORY_JSON).exists() else {}
    if meta.get("kind", "decoder") != "decoder":
        raise ValueError(f"--decoder-memory {path}: memory.json kind is {meta.get('kind')!r}, a decoder memory is needed")
    check_compatible(card, base_tokenizer, base.config.to_dict())
    return load_memory_model(path, base), card.weight, card.temperature


def scored_positions(stream: np.ndarray, token_mask: np.ndarray | None) -> np.ndarray | None:
    """Which of the stream's positions 0..len-2 count: those whose next token is a target (None: all)."""
    return None if token_mask is None else np.asarray(token_mask[1 : len(stream)], dtype=bool)


def evaluate_systems(base, augment, composition: Composition, stream: np.ndarray, context: int, stride: int, token_mask: np.ndarray | None = None, decoder=None, progress: bool = True) -> dict:
    """Test perplexities; ``decoder``: (model, λ, T) of a decoder memory to compare with, or None."""
    keep = scored_positions(stream, token_mask)

    def lp(model, desc, temperature=1.0):
        out = model_logprobs(model, stream, context, stride, desc, (temperature,), progress)[temperature]
        return out if keep is None else out[keep]

    logp = {"base": lp(base, "compose: base on test"), "augment": lp(augment, "compose: augment on test")}
    with composed(base, augment, composition):
        logp["composition"] = lp(base, "compose: composition on test")
    result = {"positions": int(len(logp["base"]))}
    if decoder is not None:
        model, weight, temperature = decoder
        mem = lp(model, "compose: decoder memory on test", temperature)
        logp["decoder_memory"] = mix_at_targets(logp["base"], mem, weight).numpy()
        result.update(decoder_lambda=weight, decoder_temperature=temperature)
    result["test"] = {k: perplexity(v) for k, v in logp.items()}
    return result


def write_report(out: Path, report: dict) -> None:
    """report.json, report.md and compose.png (training loss and the perplexities)."""
    from memories.artifact import write_json_atomic

    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report))
    plot(report, out / "compose.png")


def report_markdown(r: dict) -> str:
    t = r["test"]
    lines = [
        "# Composition (calm memory) evaluation",
        "",
        f"Test positions scored: {r['positions']}{' (completion tokens only)' if r.get('completion_only') else ''}; "
        f"windows of {r['context']} tokens, stride {r['stride']}.",
        "",
        "| system | test ppl |",
        "|---|---:|",
    ]
    for k in SYSTEMS:
        if k in t:
            extra = f" (λ={r['decoder_lambda']}, T={r['decoder_temperature']})" if k == "decoder_memory" else ""
            lines.append(f"| {LABELS[k]}{extra} | {t[k]:.3f} |")
    tr = r.get("training", {})
    if tr:
        lines += [
            "",
            f"Training: {tr.get('steps')} steps over {tr.get('windows')} windows ({tr.get('positions')} positions), "
            f"{tr.get('train_seconds', 0):.1f} s; composition parameters {tr.get('parameters')}.",
        ]
        val = tr.get("validation") or []
        if val:
            lines.append("Validation loss by epoch (epoch 0 = untrained = the base): " + ", ".join(f"{v['epoch']}: {v['loss']:.4f}" for v in val) + ".")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in r.get("training", {}).get("history", [])]
    losses = [h["loss"] for h in r.get("training", {}).get("history", [])]
    if steps:
        left.plot(steps, losses, lw=0.8, alpha=0.5, label="batch loss")
        k = max(2, len(losses) // 10)
        if len(losses) >= 2 * k:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            left.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k} steps")
        val = r["training"].get("validation") or []
        epochs = max(1, max(h["epoch"] for h in r["training"]["history"]))
        per_epoch = len(steps) / epochs
        left.plot([v["epoch"] * per_epoch for v in val], [v["loss"] for v in val], "o--", color="tab:red", label="validation (step 0: the base)")
        left.legend(fontsize=8)
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    left.set_title("composition training")
    names = [k for k in SYSTEMS if k in r["test"]]
    bars = right.bar(range(len(names)), [r["test"][k] for k in names], color=["gray", "tab:orange", "tab:blue", "tab:green"][: len(names)])
    right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_xticks(range(len(names)), [LABELS[k] for k in names], rotation=15, fontsize=7)
    values = [r["test"][k] for k in names]
    if max(values) > 10 * min(values):
        right.set_yscale("log")
    right.set_ylabel("test perplexity")
    right.set_title("test perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
