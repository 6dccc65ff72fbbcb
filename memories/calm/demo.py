"""The two calm demos, reproducible with one command: ``python -m memories.calm.demo`` (or ``memserve memory calm-demo``).

- **law**: m_A = the default base's first 6 layers continued-pretrained on
  ``demo:law`` (``memserve memory augment``), composed into the base on 40 k
  law training tokens (``memserve memory compose``); test perplexity of the
  base, m_A, the composition and the base + the law decoder memory, on the
  decoder memory's own test positions.
- **keyvalue**: m_A memorises 500 random "KEY = VALUE" facts
  (``memories.calm.keyvalue``); compositions (``KV_VARIANTS``, one record per
  training row) are trained on a question format over 20 % of the keys and
  tested, by greedy exact match, on the other 80 %.

Everything goes under ``<MEMSERVE_CACHE>/calm-demo`` unless ``--out`` says
otherwise; every step is a resumable stage, so a re-run reuses what is done.
The tables land in ``OUT/calm-demo.md`` (and ``OUT/PART.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger("memserve.memory")

PARTS = ("law", "keyvalue")
# m_A for law: K = 6 layers (why: memories/README.md, "calm demo"); 150 k tokens = 293 windows of 512, one epoch.
LAW_AUGMENT = dict(layers=6, max_tokens=150_000, eval_tokens=5_000, context=512, stride=512, epochs=1, lr=1e-3)
# The composition: the law decoder memory's own training slice and test positions (40 k / 5 k tokens, windows of 512).
LAW_COMPOSE = dict(max_tokens=40_000, eval_tokens=5_000, context=512, stride=512, epochs=1, batch=1, lr=1e-3, gate_lr=0.1, connections=4)
# Key-value: 500 keys, 20 % for training the composition (300 records: 100 keys × 3 phrasings).
KV_KEYS, KV_TRAIN_FRACTION, KV_SEED = 500, 0.2, 0
KV_COMPOSE = dict(connections=4, epochs=10, lr=1e-3, gate_lr=None, batch=8)  # one record per row: memories.calm.keyvalue.compose_records
# The second composition reads m_A's last layer only (where a probe finds the value: memories/README.md), into two late
# base layers, with weight decay: fewer ways to memorise the training keys from their token features.
KV_COMPOSE_LAST = dict(connections=[(5, 23), (5, 27)], epochs=10, lr=1e-3, gate_lr=None, batch=8, weight_decay=0.1)
# The third: the compose pipeline's gates' own rate (--gate-lr 0.1), measured to open the gates sooner on law.
KV_COMPOSE_GATES = dict(KV_COMPOSE, gate_lr=0.1)
KV_VARIANTS = {
    "composition (4 connections, m_A layers 0/2/3/5 → base 5/11/17/23)": ("keyvalue-calm", KV_COMPOSE),
    "composition (m_A's last layer → base 23 and 27, weight decay 0.1)": ("keyvalue-calm-last", KV_COMPOSE_LAST),
    "composition (4 connections, gates at rate 0.1)": ("keyvalue-calm-gates", KV_COMPOSE_GATES),
}


def _flags(d: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())


def law(root: Path, base: str, decoder_memory: str | None, threads: int = 1, progress: bool = True) -> dict:
    from memories.calm.augment import AugmentConfig, build_augment, read_report
    from memories.calm.pipeline import ComposeConfig, compose

    started = time.time()
    augment_dir = root / "law-augment"
    build_augment(AugmentConfig(base=base, corpus="demo:law", out=str(augment_dir), threads=threads, progress=progress, **LAW_AUGMENT))
    aug = read_report(augment_dir)
    t_aug = time.time()
    cfg = ComposeConfig(base=base, augment=str(augment_dir), corpus="demo:law", name="law-calm", out=str(root), domain="law", decoder_memory=decoder_memory, threads=threads, progress=progress, **LAW_COMPOSE)
    path = compose(cfg)
    metrics = json.loads((path / "memory.json").read_text())["metrics"]
    cpu = {name: json.loads((cfg.work / name / "stage.json").read_text()).get("cpu_seconds") for name in ("corpus", "train", "evaluate")}
    cpu["augment"] = json.loads((augment_dir / "stage.json").read_text()).get("cpu_seconds")
    result = {
        "cpu_seconds": cpu,
        "validation_ppl_augment": aug["perplexity"]["augment"]["validation"],
        "augment": {"path": str(augment_dir), "test_ppl": aug["perplexity"]["augment"]["test"], "test_ppl_untrained_cut": aug["perplexity"]["cut_untrained"]["test"], "train_tokens": aug["train"]["tokens"], "steps": aug["train"]["steps"], "seconds": aug["seconds"], "first_loss": aug["train"]["first_loss"], "last_loss": aug["train"]["last_loss"]},
        "memory": str(path),
        "metrics": metrics,
        "commands": [
            f"memserve memory augment --base {base} --corpus demo:law --out {augment_dir} {_flags(LAW_AUGMENT)} --threads {threads}",
            f"memserve memory compose --base {base} --augment {augment_dir} --corpus demo:law --name law-calm --out {root} {_flags(LAW_COMPOSE)}"
            + (f" --decoder-memory {decoder_memory}" if decoder_memory else "") + f" --threads {threads}",
        ],
        "wall_seconds_this_run": {"augment": round(t_aug - started, 1), "compose": round(time.time() - t_aug, 1)},
    }
    (root / "law.json").write_text(json.dumps(result, indent=1))
    return result


def keyvalue(root: Path, base: str, threads: int = 1, progress: bool = True, keys: int = KV_KEYS, variants: Sequence[str] | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memories.calm.augment import read_report
    from memories.calm.composition import COMPOSITION_FILE, Composition, CompositionSpec
    from memories.calm.hf import composed
    from memories.calm.keyvalue import KeyValueConfig, compose_records, exact_match, fact_records, make_facts, memorise, model_forward, split_keys, task_records, write_task
    from memories.stage import set_threads

    started = time.time()
    kv = root / "keyvalue"
    augment_dir = root / "kv-augment"
    mcfg = KeyValueConfig(base=base, out=str(augment_dir), keys=keys, seed=KV_SEED, threads=threads, progress=progress)
    memorise(mcfg)
    t_aug = time.time()
    facts = make_facts(keys, KV_SEED)
    task = write_task(facts, kv, KV_TRAIN_FRACTION, KV_SEED)
    train_keys, test_keys = split_keys(list(facts), KV_TRAIN_FRACTION, KV_SEED)
    paths = {label: compose_records(base, str(augment_dir), task_records(facts, train_keys), root, name, threads=threads, progress=progress, **opts) for label, (name, opts) in KV_VARIANTS.items() if variants is None or name in variants}
    t_compose = time.time()

    set_threads(threads)
    tok = AutoTokenizer.from_pretrained(base)
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    base_model, augment = load(base), load(augment_dir)
    cards = {label: json.loads((p / "memory.json").read_text()) for label, p in paths.items()}
    sets = {"held-out keys": task_records(facts, test_keys), "training keys": task_records(facts, train_keys)}

    def composed_forward(composition):
        def forward(ids):
            with composed(base_model, augment, composition):
                return base_model(input_ids=ids, logits_to_keep=1).logits

        return forward

    systems = {"base alone": model_forward(base_model), "m_A alone": model_forward(augment)}
    for label, p in paths.items():
        comp = Composition.load(p / COMPOSITION_FILE, CompositionSpec.from_card(p.name, cards[label]), p.name).eval()
        systems[label] = composed_forward(comp)
    table: dict[str, dict] = {}
    examples: dict[str, list] = {}
    with torch.inference_mode():
        for sname, fwd in systems.items():
            for setname, recs in sets.items():
                r = exact_match(fwd, tok, recs, progress, f"{sname} on {setname}")
                by_template = {str(t): sum(x["ok"] for x in r["rows"] if x["template"] == t) / max(1, sum(1 for x in r["rows"] if x["template"] == t)) for t in range(3)}
                table.setdefault(sname, {})[setname] = {"accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"], "by_template": by_template}
                examples[f"{sname} / {setname}"] = r["rows"][:6]
        recall = exact_match(model_forward(augment), tok, fact_records(facts, test_keys), progress, "m_A on its own format")
    result = {
        "keys": keys, "train_keys": len(train_keys), "test_keys": len(test_keys),
        "augment": {"path": str(augment_dir), **read_report(augment_dir)["fact_recall"], "held_out_fact_recall": recall["accuracy"], "seconds": read_report(augment_dir)["seconds"], "cpu_seconds": json.loads((augment_dir / "stage.json").read_text()).get("cpu_seconds")},
        "memories": {label: str(p) for label, p in paths.items()},
        "compose_metrics": {label: c["metrics"] for label, c in cards.items()},
        "exact_match": table,
        "examples": examples,
        "commands": [
            "python -m memories.calm.demo --parts keyvalue  (memorisation: memories.calm.keyvalue.memorise, " + json.dumps({k: getattr(mcfg, k) for k in ("keys", "layers", "packings", "per_sequence", "lr")}) + ")",
            *(f"(composition {name}: memories.calm.keyvalue.compose_records on {task['train']}, one record per row, {json.dumps(opts)})" for name, opts in KV_VARIANTS.values()),
        ],
        "wall_seconds_this_run": {"augment": round(t_aug - started, 1), "compose": round(t_compose - t_aug, 1), "exact_match": round(time.time() - t_compose, 1)},
    }  # fmt: skip
    (root / "keyvalue.json").write_text(json.dumps(result, indent=1))
    return result


def markdown(root: Path) -> str:
    """The tables from whichever parts have results in ``root``."""
    lines = ["# calm demo", ""]
    if (root / "law.json").exists():
        r = json.loads((root / "law.json").read_text())
        m, a = r["metrics"], r["augment"]
        lines += [
            "## law: test perplexity (demo:law test split, first 5,000 tokens, windows of 512)",
            "",
            "| system | test ppl |",
            "|---|---:|",
            f"| base (SmolLM2-135M-Instruct) | {m['test_ppl_base']:.2f} |",
            f"| base's first {LAW_AUGMENT['layers']} layers, untrained | {a['test_ppl_untrained_cut']:.4g} |",
            f"| m_A (those layers, trained on {a['train_tokens']:,} law tokens) | {m['test_ppl_augment']:.2f} |",
            f"| composition base ⊕ m_A (CALM, {m['steps']} steps on {LAW_COMPOSE['max_tokens']:,} tokens) | {m['test_ppl_composition']:.2f} |",
        ]
        if "test_ppl_decoder_memory" in m:
            lines.append(f"| base + decoder memory `{m['decoder_memory']}` (λ {m['decoder_lambda']}, T {m['decoder_temperature']}) | {m['test_ppl_decoder_memory']:.2f} |")
        cpu = r.get("cpu_seconds", {})
        lines += [
            "",
            f"Validation loss (nats/token, validation split): base {m['validation_loss_base']:.4f}, composition {m['validation_loss_composition']:.4f}; "
            f"m_A's validation perplexity {r.get('validation_ppl_augment', float('nan')):.1f}.",
            f"m_A build {a['seconds']:.0f} s wall ({cpu.get('augment') or 0:.0f} s CPU); composition {m['compose_seconds']:.0f} s wall "
            f"(training {m['train_seconds']:.0f} s wall, {cpu.get('train') or 0:.0f} s CPU; evaluation {cpu.get('evaluate') or 0:.0f} s CPU). "
            "CPU seconds are this process's own (1 thread): what an idle core would take; wall time includes waiting for a shared CPU.",
            "",
            "```",
            *r["commands"],
            "```",
            "",
        ]
    if (root / "keyvalue.json").exists():
        r = json.loads((root / "keyvalue.json").read_text())
        t = r["exact_match"]
        lines += [
            f"## key-value: greedy exact match ({r['keys']} keys; composition trained on {r['train_keys']}, tested on the other {r['test_keys']}; 3 question phrasings each)",
            "",
            "| system | held-out keys | training keys |",
            "|---|---:|---:|",
        ]
        for s, row in t.items():
            h, tr = row["held-out keys"], row["training keys"]
            lines.append(f"| {s} | {100 * h['accuracy']:.1f} % ({h['correct']}/{h['total']}) | {100 * tr['accuracy']:.1f} % ({tr['correct']}/{tr['total']}) |")
        a = r["augment"]
        lines += [
            "",
            f"m_A recalls {100 * a['accuracy']:.1f} % of all {a['total']} facts in its own format (\" KEY =\" → value). "
            f"Chance is 1/64 = 1.6 %. m_A build {a['seconds']:.0f} s wall ({a.get('cpu_seconds', 0):.0f} s CPU); composition training "
            + "; ".join(f"{m['seconds']:.0f} s wall ({m['cpu_seconds']:.0f} s CPU, {m['steps']} steps)" for m in r["compose_metrics"].values())
            + f"; exact-match evaluation {r['wall_seconds_this_run']['exact_match']:.0f} s wall.",
            "",
            "```",
            *r["commands"],
            "```",
            "",
        ]
    return "\n".join(lines)


def run(out: str | Path | None = None, parts=PARTS, base: str | None = None, decoder_memory: str | None = "", threads: int = 1, progress: bool = True, kv_keys: int = KV_KEYS, kv_variants: Sequence[str] | None = None) -> Path:
    from memories.base_model import cache_dir, default_base

    root = Path(out) if out else cache_dir() / "calm-demo"
    root.mkdir(parents=True, exist_ok=True)
    base = str(base or default_base())
    if decoder_memory == "":
        found = cache_dir() / "memories" / "law"
        decoder_memory = str(found) if (found / "memory.json").exists() else None
    for part in parts:
        t = time.time()
        if part == "law":
            law(root, base, decoder_memory, threads, progress)
        elif part == "keyvalue":
            keyvalue(root, base, threads, progress, kv_keys, kv_variants)
        else:
            raise ValueError(f"unknown part {part!r}: choose from {', '.join(PARTS)}")
        log.info("calm demo %s done in %.0f s", part, time.time() - t)
    md = root / "calm-demo.md"
    md.write_text(markdown(root))
    return md


def add_demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default: <cache>/calm-demo)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of the demos (default %(default)s)")
    p.add_argument("--base", default=None, help="base model directory (default: the embedded SmolLM2-135M-Instruct, converted into <cache>/base)")
    p.add_argument("--decoder-memory", default="", help="decoder memory for the law table (default: <cache>/memories/law when it exists; 'none' for no decoder row)")
    p.add_argument("--kv-keys", type=int, default=KV_KEYS, help="keys of the key-value demo, 20 %% of them for training (default %(default)s)")
    p.add_argument("--kv-variants", default=",".join(name for name, _ in KV_VARIANTS.values()), help="key-value compositions to train and score (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_args(args: argparse.Namespace) -> int:
    dm = None if args.decoder_memory == "none" else args.decoder_memory
    md = run(args.out, tuple(p for p in args.parts.split(",") if p), args.base, dm, args.threads, not args.no_progress, args.kv_keys, tuple(v for v in args.kv_variants.split(",") if v))
    print(md.read_text())
    print(f"tables written to {md}")
    return 0


def add_calm_demo_command(subparsers) -> None:
    text = "run the two calm demos (law perplexity, key-value generalisation) and write their tables"
    p = subparsers.add_parser("calm-demo", help=text, description=text)
    add_demo_options(p)
    p.set_defaults(func=_run_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memories.calm.demo", description=__doc__.split("\n\n")[0])
    add_demo_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return _run_args(args)


if __name__ == "__main__":
    sys.exit(main())
