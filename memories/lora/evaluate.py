"""Held-out evaluation of the generator: base vs mean of training LoRAs vs generated vs trained.

All four are the same base with a different ΔW merged into the top layers'
projections (``memories.lora.topstack.deltas_merged``), scored on the same
cached test windows with the one perplexity function. The generated LoRA
comes from the held-out domain's *train* documents through the same path as
``memserve memory generate`` (text → windows → encoder → decoder), timed end
to end; the trained LoRA is that domain's own run of the collection recipe,
timed from its encoder pass to its last step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("memserve.generator")

VARIANTS = ("base", "mean", "generated", "trained")
LABELS = {"base": "base", "mean": "mean of training LoRAs", "generated": "generated LoRA", "trained": "trained LoRA (upper bound)"}


def verdict(rows: list[dict], speedup_target: float = 100.0) -> dict:
    """DnD's claims, checked on every held-out domain."""
    return {
        "generated_below_base_everywhere": all(r["ppl"]["generated"] < r["ppl"]["base"] for r in rows),
        "generated_below_mean_everywhere": all(r["ppl"]["generated"] < r["ppl"]["mean"] for r in rows),
        "speedup_at_least_target_everywhere": all(r["speedup"] >= speedup_target for r in rows),
        "speedup_target": speedup_target,
    }


def write_report(out: Path, rows: list[dict], extra: dict) -> dict:
    from memories.artifact import write_json_atomic

    report = {"domains": rows, "verdict": verdict(rows), **extra}
    write_json_atomic(out / "report.json", report)
    lines = [
        "# LoRA generator: held-out domains",
        "",
        "Test perplexity (lower is better) of the base alone and with each LoRA merged; "
        "the generated LoRA comes from the domain's train documents only.",
        "",
        "| held-out domain | test tokens | base | mean of training LoRAs | generated | trained (upper bound) | generate s | train s | speed-up | speed-up (CPU s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["ppl"]
        lines.append(
            f"| {r['domain']} | {r['test_tokens']} | {p['base']:.2f} | {p['mean']:.2f} | {p['generated']:.2f} | {p['trained']:.2f} "
            f"| {r['generate_seconds']:.2f} | {r['train_seconds']:.1f} | {r['speedup']:.0f}× | {r.get('speedup_cpu', float('nan')):.0f}× |"
        )
    v = report["verdict"]
    lines += [
        "",
        f"- generated < base on every held-out domain: **{'yes' if v['generated_below_base_everywhere'] else 'no'}**",
        f"- generated < mean of training LoRAs on every held-out domain: **{'yes' if v['generated_below_mean_everywhere'] else 'no'}**",
        f"- generation ≥ {v['speedup_target']:.0f}× faster than training the upper-bound LoRA on every domain: **{'yes' if v['speedup_at_least_target_everywhere'] else 'no'}**",
        "",
        "```",
        json.dumps(extra.get("setup", {}), indent=1),
        "```",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(out / "ppl_heldout.png", rows)
    return report


def _plot(path: Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 3.6))
    width = 0.2
    for i, v in enumerate(VARIANTS):
        xs = [j + (i - 1.5) * width for j in range(len(rows))]
        ax.bar(xs, [r["ppl"][v] / r["ppl"]["base"] for r in rows], width, label=LABELS[v])
    ax.set_xticks(range(len(rows)), [r["domain"].removeprefix("demo:") for r in rows], rotation=15, fontsize=7)
    ax.set_ylabel("test perplexity / base's")
    lo = min(r["ppl"][v] / r["ppl"]["base"] for r in rows for v in VARIANTS)
    ax.set_ylim(max(0.0, lo - 0.05), 1.05)
    ax.legend(fontsize=7)
    ax.set_title("held-out domains")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
