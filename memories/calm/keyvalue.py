"""The key-value demo of CALM (arXiv 2401.02412, §4.1) at the default base's scale.

The paper's augmenting model memorises "key = value" strings for random keys;
the composition is then trained on a task over 20 % of the keys and tested on
the other 80 %, which neither model can solve alone: the base does not know
the values, the augmenting model never saw the task. Here:

- ``make_facts``: random 5-letter keys (strings no model can know) with values
  drawn from ``VALUES``, 64 words that are one token each in the SmolLM2
  tokenizer, deterministic from a seed. One-token values make exact match the
  greedy choice of one token, so the demo measures whether the fact is routed
  from m_A into the base, not whether a 135 M base can also chain digits.
- ``split_keys``: a disjoint 20 / 80 split of the keys, deterministic from the seed.
- ``fact_examples``: m_A's memorisation data, " KEY = VALUE." facts packed into
  sequences, the loss on the value token only; every key, many shuffled packings.
- ``task_records``: the task, a question format m_A never saw
  ("Question: what is the value of KEY?\\nAnswer:" → " VALUE", and two other
  phrasings), as prompt/completion JSONL records for ``memserve memory compose``.
- ``exact_match``: greedy exact-match accuracy of any forward (base, m_A, or the
  base inside ``memories.calm.hf.composed``) on such records.

Every key is written with a space before it (" qzvkt"), in facts and in
questions, so its tokens are the same in both.
"""

from __future__ import annotations

import json
import logging
import random
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from memories.calm.augment import IGNORE

log = logging.getLogger("memserve.memory")

# 64 words that the SmolLM2 tokenizer encodes, with a leading space, as one token each.
VALUES = (
    "red blue green black white brown pink gold silver grey cat dog horse cow sheep goat lion tiger bear wolf fox bird "
    "fish frog duck owl apple pear plum grape lemon bread rice milk salt sugar tea wine beer stone sand rock iron glass "
    "paper wood tree rose leaf river lake sea hill moon star sun rain snow wind fire ice box cup bell"
).split()
TEMPLATES = (
    "Question: what is the value of {key}?\nAnswer:",
    "What value does {key} have?\nThe value is",
    "Look up {key}.\nResult:",
)
FACT = " {key} = {value}."  # the only format m_A ever sees


def make_facts(n_keys: int, seed: int = 0, key_length: int = 5) -> dict[str, str]:
    """``n_keys`` random lowercase keys → values from ``VALUES``, the same for the same seed."""
    rng = random.Random(f"keys-{seed}")
    facts: dict[str, str] = {}
    while len(facts) < n_keys:
        key = "".join(rng.choice(string.ascii_lowercase) for _ in range(key_length))
        if key not in facts:
            facts[key] = rng.choice(VALUES)
    return facts


def split_keys(keys: Sequence[str], train_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (train, test) keys: a seeded shuffle, the first ``train_fraction`` for training."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train fraction must be in (0, 1), got {train_fraction}")
    order = sorted(keys)
    random.Random(f"split-{seed}").shuffle(order)
    n = max(1, round(len(order) * train_fraction))
    return order[:n], order[n:]


def fact_examples(tokenizer, facts: dict[str, str], packings: int, per_sequence: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """m_A's memorisation data: ``packings`` shuffled passes over every fact, ``per_sequence`` facts a sequence.

    Labels are ``IGNORE`` except at the value token of each fact (the key is random:
    there is nothing to learn in predicting it).
    """
    pieces = {}
    for key, value in facts.items():
        head = tokenizer(FACT.split(" =")[0].format(key=key), add_special_tokens=False)["input_ids"]
        eq = tokenizer(" =", add_special_tokens=False)["input_ids"]
        val = tokenizer(f" {value}", add_special_tokens=False)["input_ids"]
        end = tokenizer(".", add_special_tokens=False)["input_ids"]
        pieces[key] = (head + eq, val, end)
    rng = random.Random(f"pack-{seed}")
    out = []
    keys = list(facts)
    for _ in range(packings):
        rng.shuffle(keys)
        for s in range(0, len(keys), per_sequence):
            ids, labels = [], []
            for key in keys[s : s + per_sequence]:
                prefix, val, end = pieces[key]
                ids += prefix + val + end
                labels += [IGNORE] * len(prefix) + val + [IGNORE] * len(end)
            # labels[t] is the target for position t: shift by one
            ids_t = torch.tensor(ids, dtype=torch.long)
            tgt = torch.tensor(labels[1:] + [IGNORE], dtype=torch.long)
            out.append((ids_t, tgt))
    return out


def task_records(facts: dict[str, str], keys: Iterable[str], templates: Sequence[str] = TEMPLATES) -> list[dict]:
    """Prompt/completion records of the task for ``keys``, one per key and template."""
    return [{"prompt": t.format(key=k), "completion": f" {facts[k]}", "key": k, "template": i} for k in keys for i, t in enumerate(templates)]


def fact_records(facts: dict[str, str], keys: Iterable[str]) -> list[dict]:
    """The memorised format as records (" KEY =" → " VALUE"): m_A's recall of its own facts."""
    return [{"prompt": FACT.split(" =")[0].format(key=k) + " =", "completion": f" {facts[k]}", "key": k, "template": "fact"} for k in keys]


def write_jsonl(records: Iterable[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    tmp.replace(path)
    return path


@torch.inference_mode()
def greedy(forward: Callable[[torch.Tensor], torch.Tensor], prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """``n`` greedy tokens after each prompt; ``forward`` maps ``[B, T]`` ids to logits whose last position is the next token's.

    Prompts of equal length go through together (no padding, so nothing but the
    prompt itself can reach a logit); the answers come back in the prompts' order.
    """
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for rows in groups.values():
        ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long)
        for _ in range(n):
            nxt = forward(ids)[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for j, i in enumerate(rows):
            out[i] = ids[j, len(prompts[i]) :].tolist()
    return out


def exact_match(forward: Callable[[torch.Tensor], torch.Tensor], tokenizer, records: Sequence[dict], progress: bool = False, desc: str = "exact match", batch: int = 256) -> dict:
    """Share of records whose greedy continuation is exactly the completion's tokens.

    The prompt and the completion are tokenized separately (as the compose pipeline
    trains them); as many tokens are generated as the completion has.
    """
    from tqdm import tqdm

    hits, rows = 0, []
    for s in tqdm(range(0, len(records), batch), desc=desc, unit="batch", disable=not progress):
        part = records[s : s + batch]  # greedy() batches the equal-length prompts among them
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in part]
        wants = [tokenizer(r["completion"], add_special_tokens=False)["input_ids"] for r in part]
        gots = greedy(forward, prompts, max(len(w) for w in wants))
        for r, want, got in zip(part, wants, gots):
            got = got[: len(want)]
            ok = got == want
            hits += ok
            rows.append({"key": r.get("key"), "template": r.get("template"), "want": r["completion"], "got": tokenizer.decode(got), "ok": ok})
    return {"accuracy": hits / len(records) if records else 0.0, "correct": hits, "total": len(records), "rows": rows}


def model_forward(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of the last position only (the head on one position per row)."""
    return lambda ids: model(input_ids=ids, logits_to_keep=1).logits


# --- memorisation: m_A learns every fact ------------------------------------------------------


@dataclass
class KeyValueConfig:
    base: str
    out: str  # m_A's HF directory
    keys: int = 500
    seed: int = 0
    layers: int = 6  # m_A = the base's first K layers, as `memserve memory augment` builds it
    packings: int = 12  # shuffled passes over every fact (recall reached 98.5 % at 12 in a trial)
    per_sequence: int = 32
    lr: float = 2e-3
    warmup: float = 0.05
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    threads: int = 0
    progress: bool = True

    def fingerprint_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("out", "threads", "progress", "checkpoint_every")}


def memorise(cfg: KeyValueConfig) -> Path:
    """Build m_A for the key-value demo: the base's first K layers trained on every fact (atomic, resumable)."""
    import shutil

    from transformers import AutoTokenizer

    from memories.artifact import write_json_atomic
    from memories.calm.augment import AUGMENT_JSON, copy_tokenizer, init_augment, train_lm
    from memories.stage import base_identity, set_threads
    from memories.stage import fingerprint, run_stage

    set_threads(cfg.threads)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(cfg.base)
    fp = fingerprint(base_identity=base_identity(cfg.base), values=VALUES, fact=FACT, **cfg.fingerprint_fields())
    work = out.parent / f".{out.name}.work" / fp[:16]

    def produce(tmp: Path) -> dict:
        started = time.time()
        facts = make_facts(cfg.keys, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = init_augment(cfg.base, cfg.layers)
        examples = fact_examples(tok, facts, cfg.packings, cfg.per_sequence, cfg.seed)
        rec = train_lm(model, examples, work, epochs=1, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress, desc=f"m_A memorises {cfg.keys} facts")
        recall = exact_match(model_forward(model), tok, fact_records(facts, facts), cfg.progress, "m_A recalls its facts")
        log.info("key-value m_A: recalls %.1f %% of its %d facts (\" KEY =\" → value)", 100 * recall["accuracy"], len(facts))
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(cfg.base, tmp)
        losses = rec.pop("losses")
        report = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("threads", "progress")},
            "train": {**rec, "first_loss": sum(losses[:10]) / max(1, len(losses[:10])), "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "losses": losses},
            "fact_recall": {k: recall[k] for k in ("accuracy", "correct", "total")},
            "seconds": round(time.time() - started, 1),
        }
        write_json_atomic(tmp / AUGMENT_JSON, report)
        for f in tmp.iterdir():
            f.chmod(0o644)
        return {"fact_recall": recall["accuracy"], "seconds": report["seconds"]}

    run_stage("keyvalue-augment", out, fp, produce)
    shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)
    return out


def write_task(facts: dict[str, str], out: Path, train_fraction: float = 0.2, seed: int = 0) -> dict:
    """``train.jsonl`` (the task over the training keys, for ``memory compose``) and ``test.jsonl`` (held-out keys)."""
    train_keys, test_keys = split_keys(list(facts), train_fraction, seed)
    out = Path(out)
    write_jsonl(task_records(facts, train_keys), out / "train.jsonl")
    write_jsonl(task_records(facts, test_keys), out / "test.jsonl")
    (out / "keys.json").write_text(json.dumps({"train": train_keys, "test": test_keys, "facts": facts}, indent=1))
    return {"train_keys": len(train_keys), "test_keys": len(test_keys), "train": str(out / "train.jsonl"), "test": str(out / "test.jsonl")}


# --- the composition, one record per training row -------------------------------------------------


def record_sequences(tokenizer, records: Sequence[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Each record as prompt ids + completion ids + EOS (tokenized apart, as ``memories.calm.corpus`` does), and its
    target mask (1 on the completion's tokens only)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    seqs, masks = [], []
    for r in records:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        seqs.append(p + c + eos)
        masks.append([0] * len(p) + [1] * len(c) + [0] * len(eos))
    return seqs, masks


def compose_records(base: str, augment: str, records: Sequence[dict], out: Path, name: str, *, connections: int | Sequence[Sequence[int]] = 4, epochs: int = 8, lr: float = 1e-3, gate_lr: float | None = None, batch: int = 8, weight_decay: float = 0.0, seed: int = 0, threads: int = 0, progress: bool = True, metrics: dict | None = None) -> Path:
    """Train a composition on task records, one record per row, with the compose pipeline's own parts; package it as ``out/name``.

    ``memserve memory compose`` cuts a prompt/completion corpus into windows of a
    concatenated stream, so a window holds several records. The cross-attention
    has no positions: from an answer, the m_A states of earlier records' keys look
    like its own, and which value to copy is ambiguous (measured: the validation
    loss stays at ln 64, chance, memories/README.md "calm demo"). Here every record
    is its own right-padded row (``memories.calm.train.windows_from_sequences``),
    trained by ``memories.calm.train.train_composition`` and packaged by
    ``memories.calm.package.package_calm`` with the server's checks.
    ``connections``: a number (spread as ``memory compose`` spreads them) or explicit
    ``[(augment_layer, base_layer), ...]`` pairs; ``gate_lr``: the gates' own learning
    rate (None: ``lr``, as every measured key-value run). Resumable:
    the training checkpoints and the finished composition are ``memories.stage`` outputs
    under ``out/work/name``.
    """
    from memories.calm.composition import COMPOSITION_FILE, Composition
    from memories.calm.package import package_calm
    from memories.calm.pipeline import ComposeConfig, Models, check_inputs
    from memories.calm.train import train_composition, windows_from_sequences
    from memories.stage import base_identity, set_threads
    from memories.stage import fingerprint, run_stage

    set_threads(threads)
    out = Path(out)
    pairs = None if isinstance(connections, int) else [tuple(int(x) for x in c) for c in connections]
    cfg = ComposeConfig(base=base, augment=augment, corpus="(records)", name=name, out=str(out), connections=len(pairs) if pairs else connections, epochs=epochs, lr=lr, batch=batch, weight_decay=weight_decay, seed=seed, threads=threads, progress=progress)
    spec, tok = check_inputs(cfg)
    if pairs:
        from dataclasses import replace

        from memories.calm.composition import check_layers

        spec = replace(spec, connections=tuple(pairs))
        check_layers(name, spec, int(json.loads((Path(augment) / "config.json").read_text())["num_hidden_layers"]), int(json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]))
    seqs, masks = record_sequences(tok, records)
    opts = dict(connections=pairs or connections, epochs=epochs, lr=lr, batch=batch, seed=seed, warmup=cfg.warmup, weight_decay=cfg.weight_decay, **({"gate_lr": gate_lr} if gate_lr is not None else {}))
    fp = fingerprint(base=base_identity(base), augment=base_identity(augment), records=[[s, m] for s, m in zip(seqs, masks)], spec=spec.card_fields(), **opts)
    train_dir = cfg.work / "train"

    def produce(tmp: Path) -> dict:
        models = Models(cfg)
        windows = windows_from_sequences(seqs, masks, pad_id=tok.eos_token_id or 0)
        torch.manual_seed(seed)
        composition = Composition(spec)
        started = time.time()
        rec = train_composition(models.base, models.augment, composition, windows, epochs=epochs, lr=lr, gate_lr=gate_lr, batch=batch, warmup=cfg.warmup, weight_decay=cfg.weight_decay, seed=seed, checkpoint_dir=cfg.work / "train-checkpoints" / fp[:16], checkpoint_every=cfg.checkpoint_every, progress=progress)
        composition.save(tmp / COMPOSITION_FILE)
        (tmp / "train_log.json").write_text(json.dumps({"steps": rec["history"]}, indent=1))
        losses = [h["loss"] for h in rec["history"]]
        return {"steps": rec["steps"], "rows": rec["windows"], "positions": rec["positions"], "train_seconds": round(time.time() - started, 1), "parameters": composition.num_parameters(), "first_loss": sum(losses[:10]) / len(losses[:10]), "last_loss": sum(losses[-10:]) / len(losses[-10:])}

    rec = run_stage("train", train_dir, fp, produce)
    import shutil

    shutil.rmtree(cfg.work / "train-checkpoints", ignore_errors=True)
    card_metrics = {**{k: rec.get(k) for k in ("steps", "rows", "positions", "train_seconds", "parameters", "first_loss", "last_loss")}, "epochs": epochs, "lr": lr, "gate_lr": gate_lr, "batch": batch, "cpu_seconds": rec.get("cpu_seconds"), "seconds": rec.get("seconds"), **(metrics or {})}
    summary = {"spec": "key-value task records (memories.calm.keyvalue)", "description": "prompt/completion records, one per training row; only completion tokens scored", "documents": len(records), "scored": "completion"}
    return package_calm(out / name, name=name, domain=name, description=f"calm memory: {Path(augment).name} composed into {Path(base).name} on {len(records)} key-value task records", base=base, augment=augment, base_tokenizer=tok, spec=spec, composition_file=train_dir / COMPOSITION_FILE, corpus_summary=summary, metrics=card_metrics)
