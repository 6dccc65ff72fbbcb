"""Evaluation: test-split perplexity of the base, base + kNN-LM and base + memory.

Every knob is chosen on the validation split and only then reported on test:
the kNN-LM's λ and temperature (tuned in the held-out stage) and the
memory's λ and softmax temperature (a grid). All three systems score
the same positions with the same windows, so their numbers are comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memories.artifact import uses_base_embeddings
from memories.decoder.heldout import knnlm_ppl
from memories.mixture import LAMBDA_GRID, mix_at_targets
from memories.perplexity import perplexity
from memories.perplexity import model_logprobs


MEMORY_TEMPERATURES = (1.0, 1.5, 2.0, 3.0)


def load_memory_model(path: str | Path, base):
    """A decoder memory as a transformers model in fp32 on the base's device, for scoring beside ``base``.

    A thin memory (``"embeddings": "base"``) stores no embedding or head; it gets the base's, as the server
    gives it. It is built from its config and loaded with them, so nothing is reported missing.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if not uses_base_embeddings(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(base.device).eval()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32)
    weights = {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    weights["model.embed_tokens.weight"] = base.get_input_embeddings().weight.detach()
    weights["lm_head.weight"] = base.get_output_embeddings().weight.detach()
    model.load_state_dict(weights)
    return model.to(base.device).eval()


def evaluate_memory(memory, streams: dict[str, np.ndarray], heldout_dir: Path, heldout_info: dict, out: Path, context: int, stride: int, vocab_size: int, progress=True) -> dict:
    """Tune the memory's λ and temperature on validation, report test; write report + plot.

    The memory imitates a sparse kNN distribution and can be overconfident on
    its own, so its softmax temperature (stored in memory.json, applied by the
    server's fuse) is tuned together with λ.
    """
    data = {s: dict(np.load(heldout_dir / f"{s}.npz")) for s in ("validation", "test")}
    mem_lp = {s: model_logprobs(memory, streams[s], context, stride, f"memory on {s}", MEMORY_TEMPERATURES, progress) for s in data}
    for s in data:
        if len(mem_lp[s][1.0]) != len(data[s]["base_logp"]):
            raise RuntimeError(f"{s}: memory scored {len(mem_lp[s][1.0])} positions, base {len(data[s]['base_logp'])}")

    def curve(split: str, t: float) -> list[float]:
        return [perplexity(mix_at_targets(data[split]["base_logp"], mem_lp[split][t], weight)) for weight in LAMBDA_GRID]

    val_curves = {t: curve("validation", t) for t in MEMORY_TEMPERATURES}
    temp = min(MEMORY_TEMPERATURES, key=lambda t: min(val_curves[t]))
    best = int(np.argmin(val_curves[temp]))
    weight = LAMBDA_GRID[best]
    curves = {"validation": val_curves[temp], "test": curve("test", temp)}
    knn = heldout_info["knnlm"]
    report = {
        "positions": {s: int(len(data[s]["labels"])) for s in data},
        "test": {
            "base": perplexity(data["test"]["base_logp"]),
            "knnlm": knnlm_ppl(data["test"], knn["temperature"], knn["lambda"], vocab_size),
            "memory": curves["test"][best],
            "memory_alone": perplexity(mem_lp["test"][1.0]),
        },
        "validation": {
            "base": perplexity(data["validation"]["base_logp"]),
            "knnlm": knn["validation_ppl"],
            "memory": curves["validation"][best],
        },
        "memory_lambda": weight,
        "memory_temperature": temp,
        "memory_temperature_grid": {str(t): min(c) for t, c in val_curves.items()},
        "knnlm_lambda": knn["lambda"],
        "knnlm_temperature": knn["temperature"],
        "knn_k": heldout_info["k"],
        "lambda_grid": list(LAMBDA_GRID),
        "memory_curve": curves,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    plot_curve(report, out / "ppl_vs_lambda.png")
    return {k: report[k] for k in ("test", "validation", "memory_lambda", "memory_temperature", "knnlm_lambda", "knnlm_temperature")}


def report_markdown(r: dict) -> str:
    t, v = r["test"], r["validation"]
    lines = [
        "# Memory evaluation",
        "",
        f"Positions scored: validation {r['positions']['validation']}, test {r['positions']['test']}. "
        "λ and temperatures chosen on validation, reported on test.",
        "",
        "| system | validation ppl | test ppl |",
        "|---|---:|---:|",
        f"| base | {v['base']:.3f} | {t['base']:.3f} |",
        f"| base + kNN-LM (λ={r['knnlm_lambda']}, T={r['knnlm_temperature']:.4g}, k={r['knn_k']}) | {v['knnlm']:.3f} | {t['knnlm']:.3f} |",
        f"| base + memory (λ={r['memory_lambda']}, T={r['memory_temperature']}) | {v['memory']:.3f} | {t['memory']:.3f} |",
        f"| memory alone (T=1) | – | {t['memory_alone']:.3f} |",
        "",
        f"Base + memory perplexity against λ (memory temperature {r['memory_temperature']}):",
        "",
        "| λ | " + " | ".join(str(x) for x in r["lambda_grid"]) + " |",
        "|---|" + "---:|" * len(r["lambda_grid"]),
    ]
    for s in ("validation", "test"):
        lines.append(f"| {s} | " + " | ".join(f"{x:.2f}" for x in r["memory_curve"][s]) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, style in (("validation", "--"), ("test", "-")):
        ax.plot(r["lambda_grid"], r["memory_curve"][s], style, marker="o", label=f"base + memory ({s})")
    ax.axhline(r["test"]["base"], color="gray", label="base (test)")
    ax.axhline(r["test"]["knnlm"], color="green", linestyle=":", label="base + kNN-LM (test)")
    ax.axvline(r["memory_lambda"], color="red", alpha=0.3, label=f"chosen λ = {r['memory_lambda']}")
    ax.set_xlabel("memory weight λ")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
