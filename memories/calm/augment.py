"""The augmenting model m_A of a calm memory, built from the base: its first K layers, continued-pretrained on a domain.

m_A is the base's token embedding, its first ``layers`` decoder layers, its
final norm and its (tied) head, saved as a standalone Hugging Face directory
with the base's tokenizer files (byte for byte, so the calm checks that
compare tokenizers pass). Before training it is exactly the bottom of the
base read out early; then it is trained with the causal-LM loss (AdamW,
warm-up then cosine decay) on the domain corpus's train split, so that its
states carry what the domain text says rather than what the base's lower
layers happened to compute.

The corpus is read and split exactly as ``memserve memory build`` does
(``memories.corpus``: hash split of documents, the same default fractions, the
same token caps), so the test split m_A is measured on is the one a decoder
memory built with the same ``--eval-tokens`` was measured on.

Output is atomic and resumable: the directory is assembled in a hidden
sibling and renamed into place with ``stage.json`` carrying the fingerprint
of every input; training checkpoints (every ``checkpoint_every`` steps) live in
``.<name>.work/`` next to it, and a killed run resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from memories.artifact import TOKENIZER_FILES
from memories.decoder.pipeline import BuildConfig

log = logging.getLogger("memserve.memory")

_BUILD = BuildConfig(base="", corpus="", name="", out="")
AUGMENT_JSON = "augment.json"
IGNORE = -100


@dataclass
class AugmentConfig:
    base: str
    corpus: str
    out: str  # the augmenting model's HF directory
    layers: int = 6  # K: the base's first K decoder layers
    text_field: str = "text"
    # corpus: the same defaults as `memserve memory build`
    max_tokens: int = 150_000  # training tokens
    eval_tokens: int = _BUILD.eval_tokens  # validation and test tokens each
    validation_fraction: float = _BUILD.validation_fraction
    test_fraction: float = _BUILD.test_fraction
    context: int = 512  # tokens per training / evaluation window
    stride: int = 512  # new positions per evaluation window (training windows never overlap)
    # training
    epochs: int = 1
    lr: float = 5e-4
    accumulate: int = 1  # windows per optimiser step
    warmup: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 100  # optimiser steps between resumable checkpoints
    # runtime only
    threads: int = 0
    progress: bool = True

    def fingerprint_fields(self) -> dict:
        skip = {"out", "threads", "progress", "checkpoint_every"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# --- the model ------------------------------------------------------------------------------


def init_augment(base: str | Path, layers: int):
    """m_A before training: the base's embedding, first ``layers`` layers, final norm and head (fp32)."""
    from memories.training import init_memory

    return init_memory(str(base), layers, "first")


def copy_tokenizer(base: str | Path, out: Path) -> list[str]:
    """The base's tokenizer files, copied unchanged."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(base) / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
        copied.append("(saved by transformers)")
    return copied


# --- data -----------------------------------------------------------------------------------


def corpus_streams(corpus: str, tokenizer, max_tokens: int, eval_tokens: int, validation_fraction: float, test_fraction: float, text_field: str = "text") -> tuple[dict[str, np.ndarray], dict]:
    """Token streams per split, cut exactly as the memory build's corpus stage cuts them."""
    from memories.corpus import SPLITS, CorpusError, load_corpus, split_documents
    from memories.corpus import tokenize

    loaded = load_corpus(corpus, text_field)
    splits = split_documents(loaded, validation_fraction, test_fraction)
    streams, summary = {}, {"spec": corpus, "description": loaded.description, "documents": len(loaded.documents), "identity": loaded.identity, "splits": {}}
    for s in SPLITS:
        if not splits[s]:
            raise CorpusError(f"corpus {corpus!r}: no document fell into the {s} split; add documents or raise the held-out fractions")
        cap = max_tokens if s == "train" else eval_tokens
        streams[s], used = tokenize(tokenizer, splits[s], cap + 1)
        summary["splits"][s] = {"documents": len(splits[s]), "documents_used": used, "tokens": int(len(streams[s]))}
    return streams, summary


def window_examples(tokens: np.ndarray, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping training windows of ``context + 1`` tokens: every position is a target once."""
    out = []
    for start in range(0, len(tokens) - 1, context):
        chunk = torch.as_tensor(tokens[start : start + context + 1], dtype=torch.long)
        if len(chunk) >= 2:
            out.append((chunk[:-1], chunk[1:]))
    return out


# --- training -------------------------------------------------------------------------------


def lm_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the positions whose label is not ``IGNORE``; the head runs on those only."""
    keep = labels != IGNORE
    hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep]), int(keep.sum())


def train_lm(model, examples: Sequence[tuple[torch.Tensor, torch.Tensor]], ckpt_dir: Path, *, epochs: int, lr: float, accumulate: int = 1, warmup: float = 0.05, weight_decay: float = 0.01, seed: int = 0, checkpoint_every: int = 100, progress: bool = True, desc: str = "train") -> dict:
    """Causal-LM training of every parameter of ``model`` on ``(input ids, labels)`` examples.

    Examples are shuffled per epoch (from ``seed``); ``accumulate`` of them make one
    AdamW step; the learning rate warms up linearly then decays (cosine, to a tenth).
    Every ``checkpoint_every`` steps the model, optimiser, scheduler and step go to
    ``ckpt_dir/last.pt``; a later call with the same arguments resumes from it.
    """
    from tqdm import tqdm

    from memories.training import lr_schedule

    steps_per_epoch = math.ceil(len(examples) / accumulate)
    total = steps_per_epoch * epochs
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, warmup))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.pt"
    step, losses = 0, []
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]
        log.info("%s: resumed at step %d of %d", desc, step, total)
    model.train()
    started = time.time()
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", disable=not progress)
    for epoch in range(step // steps_per_epoch, epochs):
        order = list(range(len(examples)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for s in range(step - epoch * steps_per_epoch, steps_per_epoch):
            batch = order[s * accumulate : (s + 1) * accumulate]
            total_loss = 0.0
            for i in batch:
                loss, _ = lm_loss(model, *examples[i])
                (loss / len(batch)).backward()
                total_loss += loss.item() / len(batch)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(total_loss, 4))
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if step % checkpoint_every == 0 and step < total:
                tmp = ckpt_dir / ".last.pt.partial"
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "losses": losses}, tmp)
                os.replace(tmp, last)
    bar.close()
    model.eval()
    return {"steps": total, "examples": len(examples), "epochs": epochs, "losses": losses, "seconds": round(time.time() - started, 1)}


def test_perplexity(model, tokens: np.ndarray, context: int, stride: int, desc: str, progress: bool = True) -> float:
    """Perplexity over a stream with the evaluation windows every memory report uses."""
    from memories.perplexity import model_logprobs
    from memories.perplexity import perplexity

    return perplexity(model_logprobs(model, tokens, context, stride, desc, progress=progress)[1.0])


# --- the whole build ------------------------------------------------------------------------


def build_augment(cfg: AugmentConfig) -> Path:
    """Build (or find up to date) the augmenting model at ``cfg.out``; returns that directory.

    ``augment.json`` in it records the corpus, the options, the training losses and
    the test/validation perplexity of the untrained cut and of the trained m_A.
    """
    from transformers import AutoTokenizer

    from memories.artifact import write_json_atomic
    from memories.stage import base_identity, set_threads
    from memories.stage import fingerprint, run_stage

    set_threads(cfg.threads)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_cfg = json.loads((Path(cfg.base) / "config.json").read_text())
    if not 1 <= cfg.layers <= int(base_cfg["num_hidden_layers"]):
        raise ValueError(f"--layers must be in 1..{base_cfg['num_hidden_layers']} (the base's depth), got {cfg.layers}")
    tok = AutoTokenizer.from_pretrained(cfg.base)
    from memories.corpus import load_corpus

    identity = load_corpus(cfg.corpus, cfg.text_field).identity
    fp = fingerprint(base_identity=base_identity(cfg.base), corpus_identity=identity, **cfg.fingerprint_fields())
    work = out.parent / f".{out.name}.work" / fp[:16]

    def produce(tmp: Path) -> dict:
        started = time.time()
        streams, summary = corpus_streams(cfg.corpus, tok, cfg.max_tokens, cfg.eval_tokens, cfg.validation_fraction, cfg.test_fraction, cfg.text_field)
        torch.manual_seed(cfg.seed)
        model = init_augment(cfg.base, cfg.layers)
        before = {s: test_perplexity(model, streams[s], cfg.context, cfg.stride, f"cut alone on {s}", cfg.progress) for s in ("validation", "test")}
        log.info("augment: the base's first %d layers alone: test perplexity %.1f", cfg.layers, before["test"])
        examples = window_examples(streams["train"], cfg.context)
        rec = train_lm(model, examples, work, epochs=cfg.epochs, lr=cfg.lr, accumulate=cfg.accumulate, warmup=cfg.warmup, weight_decay=cfg.weight_decay, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress, desc=f"train m_A ({cfg.layers} layers)")
        after = {s: test_perplexity(model, streams[s], cfg.context, cfg.stride, f"m_A on {s}", cfg.progress) for s in ("validation", "test")}
        log.info("augment: trained m_A: test perplexity %.2f (untrained cut %.1f)", after["test"], before["test"])
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(cfg.base, tmp)
        losses = rec.pop("losses")
        report = {
            "base_model": Path(cfg.base).name,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("threads", "progress")},
            "corpus": summary,
            "layers_from_base": list(range(cfg.layers)),
            "train": {**rec, "tokens": int(len(streams["train"])), "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:])), "losses": losses},
            "perplexity": {"cut_untrained": before, "augment": after, "windows": {"context": cfg.context, "stride": cfg.stride}},
            "seconds": round(time.time() - started, 1),
        }
        write_json_atomic(tmp / AUGMENT_JSON, report)
        for f in tmp.iterdir():
            f.chmod(0o644)
        return {"test_ppl": after["test"], "test_ppl_cut": before["test"], "seconds": report["seconds"]}

    run_stage("augment", out, fp, produce)
    shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)  # the finished model supersedes the checkpoints
    return out


def read_report(path: str | Path) -> dict:
    return json.loads((Path(path) / AUGMENT_JSON).read_text())


# --- CLI ------------------------------------------------------------------------------------


def add_augment_command(subparsers) -> None:
    """``memserve memory augment``: build the augmenting model of a calm memory."""
    d = AugmentConfig(base="", corpus="", out="")
    text = "build a calm memory's augmenting model: the base's first K layers + final norm + head, continued-pretrained on a domain corpus"
    p = subparsers.add_parser("augment", help=text, description=text)
    p.add_argument("--base", required=True, help="base model: a Hugging Face directory (Llama family)")
    p.add_argument("--corpus", required=True, help="text file, .jsonl file, folder of .txt files, or demo:biomed|law|finance (split as `memory build` splits it)")
    p.add_argument("--out", required=True, help="output HF directory of the augmenting model (written atomically; checkpoints in .NAME.work beside it)")
    p.add_argument("--layers", type=int, default=d.layers, help="K: keep the base's first K decoder layers (default %(default)s)")
    p.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="training tokens taken from the train split (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation and test tokens each, as in `memory build` (default %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=d.validation_fraction, help="share of documents held out as validation (default %(default)s, as `memory build`)")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of documents held out as test (default %(default)s, as `memory build`)")
    p.add_argument("--context", type=int, default=d.context, help="tokens per training and evaluation window (default %(default)s)")
    p.add_argument("--stride", type=int, default=d.stride, help="new positions per evaluation window (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training windows (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default %(default)s)")
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="windows per optimiser step (default %(default)s)")
    p.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of steps (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the window order (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="optimiser steps between resumable checkpoints (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads; 0: all cores (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_augment)


def _run_augment(args) -> int:
    names = {f for f in AugmentConfig.__dataclass_fields__}
    cfg = AugmentConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.progress = not args.no_progress
    path = build_augment(cfg)
    report = read_report(path)
    ppl = report["perplexity"]
    print(f"augmenting model ready: {path}")
    print(f"test perplexity: m_A {ppl['augment']['test']:.2f} (the base's first {cfg.layers} layers untrained: {ppl['cut_untrained']['test']:.1f})")
    return 0
