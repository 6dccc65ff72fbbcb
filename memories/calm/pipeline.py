"""``memserve memory compose``, stage by stage: corpus → train → evaluate → package.

Layout with ``--out OUT --name NAME`` (work files under ``OUT/work/NAME``, or
``--work-root``):

    OUT/NAME/                     the calm memory: memory.json, augment/, composition.safetensors
    WORK/corpus/                  token streams per split (.npy; .mask.npy for prompt/completion corpora)
    WORK/train/                   composition.safetensors + train_log.json (loss per step, validation per epoch)
    WORK/train-checkpoints/FP/    the last checkpoint of an unfinished training run
    WORK/evaluate/                report.json, report.md, compose.png

The corpus stage is the one every build shares (``memories.corpus.stage_corpus``,
same split fractions, caps and tokenization): with the same corpus spec,
``--eval-tokens``, ``--context`` and ``--stride`` the test positions are those a
decoder memory was scored on, so the numbers compare. Every stage is a
``memories.stage`` stage (temporary folder renamed into place with its
fingerprint; a re-run skips what is up to date); training resumes from its
last checkpoint. Packaging checks the artifact with the server's own checks.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from memories.decoder.pipeline import BuildConfig

from memories.stage import base_identity, set_threads
from memories.stage import StageError, Stages, StopAfter, fingerprint, require, run_stage

log = logging.getLogger("memserve.compose")

_BUILD = BuildConfig(base="", corpus="", name="", out="")  # the decoder build's defaults, shared where they must agree


class ComposeInputError(StageError):
    """Inputs that cannot make a calm memory: the message says which and why."""


@dataclass
class ComposeConfig:
    base: str
    augment: str
    corpus: str
    name: str
    out: str
    domain: str | None = None
    description: str = ""
    text_field: str = _BUILD.text_field
    # corpus and windows: the decoder build's defaults, so that splits and test positions agree
    max_tokens: int = _BUILD.max_tokens
    eval_tokens: int = _BUILD.eval_tokens
    validation_fraction: float = _BUILD.validation_fraction
    test_fraction: float = _BUILD.test_fraction
    context: int = _BUILD.context
    stride: int = _BUILD.stride
    # composition
    connections: int = 4
    heads: int = 0  # 0: the base's attention heads
    # training
    epochs: int = 1
    lr: float = 3e-3
    gate_lr: float = 0.1  # the gates' own rate (memories.calm.train.parameter_groups says why; measured in memories/README.md)
    batch: int = 4
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    # evaluation
    decoder_memory: str | None = None
    # runtime only (never part of a fingerprint)
    checkpoint_every: int = 50
    work_root: str | None = None
    threads: int = 0
    progress: bool = True
    stop_after: str | None = None

    @property
    def work(self) -> Path:
        return Path(self.work_root or Path(self.out) / "work") / self.name

    @property
    def artifact(self) -> Path:
        return Path(self.out) / self.name


STAGES = ("corpus", "train", "evaluate", "package")


def config_fields() -> set[str]:
    return {f.name for f in fields(ComposeConfig)}


# --- inputs -------------------------------------------------------------------------------


def _config(path: str, what: str) -> dict:
    if not Path(path).is_dir():
        raise ComposeInputError(f"{what} {path!r} is not a directory")
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except FileNotFoundError:
        raise ComposeInputError(f"{what} {path!r} is not a Hugging Face model directory (no config.json)") from None


def load_base_tokenizer(cfg: ComposeConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.base)
    except Exception as e:
        raise ComposeInputError(f"base {cfg.base!r}: no readable tokenizer ({e})") from None


def composition_spec(cfg: ComposeConfig):
    """The composition's shape from both models' configs and ``--connections`` / ``--heads``; refuses what cannot work."""
    from memories.calm.artifact import SUPPORTED_BASES
    from memories.calm.composition import CompositionSpec, default_connections

    base_cfg, aug_cfg = _config(cfg.base, "--base"), _config(cfg.augment, "--augment")
    arch = (base_cfg.get("architectures") or [""])[0]
    if arch not in SUPPORTED_BASES:
        raise ComposeInputError(f"--base {cfg.base!r} is {arch or 'of no architecture'}; calm memories compose into {', '.join(SUPPORTED_BASES)}")
    nb, na = int(base_cfg["num_hidden_layers"]), int(aug_cfg["num_hidden_layers"])
    try:
        pairs = default_connections(cfg.connections, na, nb)
    except ValueError:
        raise ComposeInputError(f"--connections {cfg.connections}: must be in 1..{min(na, nb)} (augment has {na} layers, base {nb})") from None
    heads = cfg.heads or int(base_cfg["num_attention_heads"])
    width = int(base_cfg["hidden_size"])
    if heads < 1 or width % heads:
        raise ComposeInputError(f"--heads {heads}: must divide the base's width {width}")
    return CompositionSpec(tuple(pairs), int(aug_cfg["hidden_size"]), width, heads)


def check_inputs(cfg: ComposeConfig):
    """Everything that can be refused before any model is loaded; returns (spec, base tokenizer).

    The augmenting model is read with the server's decoder checks (architecture,
    weights present) and must read the base's token ids: a shipped tokenizer,
    else its memory.json ``tokenizer_sha256``, hashing like the base's, and a
    vocabulary at least the base tokenizer's size.
    """
    from memories.artifact import ArtifactError, MemoryCard, check_tokenizer, read_card

    spec = composition_spec(cfg)
    tok = load_base_tokenizer(cfg)
    try:
        card = read_card(cfg.augment, "augment")
        if card.embeddings == "base":
            raise ComposeInputError(f"--augment {cfg.augment!r} is a thin memory (no embedding or head of its own): it cannot run alone as an augmenting model")
        check_tokenizer(MemoryCard(name="augment", path=card.path, tokenizer_sha256=card.tokenizer_sha256), tok)
    except ArtifactError as e:
        raise ComposeInputError(f"--augment {cfg.augment!r}: {e.check}: {e.detail}") from None
    if card.vocab_size < len(tok):
        raise ComposeInputError(f"--augment {cfg.augment!r}: vocab_size {card.vocab_size} is smaller than the base tokenizer's {len(tok)} tokens")
    if cfg.decoder_memory:
        check_decoder_memory(cfg, tok)
    for key in ("epochs", "batch", "context", "stride"):
        if getattr(cfg, key) < 1:
            raise ComposeInputError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.stride > cfg.context:
        raise ComposeInputError(f"--stride {cfg.stride} must not exceed --context {cfg.context}")
    return spec, tok


def check_decoder_memory(cfg: ComposeConfig, tok) -> None:
    """``--decoder-memory`` must be a decoder memory the server would fuse into this base."""
    from memories.artifact import ArtifactError, check_compatible, read_card, read_memory_json

    path = Path(cfg.decoder_memory)
    if not path.is_dir():
        raise ComposeInputError(f"--decoder-memory {cfg.decoder_memory!r} is not a directory")
    try:
        kind = read_memory_json(path, path.name).get("kind", "decoder")
        if kind != "decoder":
            raise ComposeInputError(f"--decoder-memory {cfg.decoder_memory!r} is a {kind} memory; only a decoder memory has a fused perplexity to compare")
        check_compatible(read_card(path, path.name), tok, _config(cfg.base, "--base"))
    except ArtifactError as e:
        raise ComposeInputError(f"--decoder-memory {cfg.decoder_memory!r}: {e.check}: {e.detail}") from None


class Models:
    """The base and the augmenting model, loaded on first use (a re-run whose stages are all up to date loads neither).

    Both in fp32 on this process's device, frozen (``requires_grad_(False)``, eval mode).
    Pass ``base=``/``augment=`` to reuse models already in memory.
    """

    def __init__(self, cfg: ComposeConfig, base=None, augment=None):
        self._cfg, self._base, self._augment = cfg, base, augment

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM

        from memories.calm.train import freeze
        from memories.distributed import world

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(world().device)
        freeze(model)
        return model

    @property
    def base(self):
        if self._base is None:
            self._base = self._load(self._cfg.base)
        return self._base

    @property
    def augment(self):
        if self._augment is None:
            self._augment = self._load(self._cfg.augment)
        return self._augment


# --- stages -------------------------------------------------------------------------------


def stage_corpus(cfg: ComposeConfig) -> dict:
    """Token streams per split: the decoder build's corpus stage, or a prompt/completion one (only completions scored)."""
    from memories.calm.corpus import is_prompt_completion, load_prompt_completion, write_prompt_completion_splits

    if not is_prompt_completion(cfg.corpus):
        from memories.corpus import stage_corpus as build_corpus_stage

        return build_corpus_stage(cfg)  # reads only the corpus/split/cap fields ComposeConfig shares with BuildConfig
    from memories.artifact import tokenizer_sha256

    corpus = load_prompt_completion(cfg.corpus)
    tok = load_base_tokenizer(cfg)
    fp = fingerprint(corpus=corpus.identity, tokenizer=tokenizer_sha256(tok), max_tokens=cfg.max_tokens, eval_tokens=cfg.eval_tokens, fractions=[cfg.validation_fraction, cfg.test_fraction], scored="completion")
    produce = lambda tmp: {"summary": write_prompt_completion_splits(corpus, tok, tmp, cfg.max_tokens, cfg.eval_tokens, cfg.validation_fraction, cfg.test_fraction)}  # noqa: E731
    return run_stage("corpus", cfg.work / "corpus", fp, produce)


def load_split(cfg: ComposeConfig, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(token stream, token mask or None) of one split from the corpus stage."""
    d = cfg.work / "corpus"
    require(d, "corpus stage", "`memserve memory compose`")
    mask = d / f"{split}.mask.npy"
    return np.load(d / f"{split}.npy"), (np.load(mask) if mask.exists() else None)


def _train_options(cfg: ComposeConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("context", "stride", "epochs", "lr", "gate_lr", "batch", "warmup", "weight_decay", "seed")}


def stage_train(cfg: ComposeConfig, models: Models | None = None, spec=None) -> dict:
    """Train a fresh composition on the train split; the validation split's loss is logged per epoch."""
    from memories.calm.composition import COMPOSITION_FILE, Composition
    from memories.calm.train import train_composition, windows_from_stream

    spec = spec or composition_spec(cfg)
    corpus = require(cfg.work / "corpus", "corpus stage", "`memserve memory compose`")
    fp = fingerprint(corpus=corpus["fingerprint"], base=base_identity(cfg.base), augment=base_identity(cfg.augment), spec=spec.card_fields(), **_train_options(cfg))
    ckpt = cfg.work / "train-checkpoints" / fp[:16]

    def produce(tmp: Path) -> dict:
        m = models or Models(cfg)
        train_stream, train_mask = load_split(cfg, "train")
        train = windows_from_stream(train_stream, cfg.context, cfg.stride, train_mask)
        val_stream, val_mask = load_split(cfg, "validation")
        validation = windows_from_stream(val_stream, cfg.context, cfg.stride, val_mask)
        torch.manual_seed(cfg.seed)
        composition = Composition(spec)
        started = time.time()
        rec = train_composition(
            m.base, m.augment, composition, train, epochs=cfg.epochs, lr=cfg.lr, gate_lr=cfg.gate_lr, batch=cfg.batch, warmup=cfg.warmup,
            weight_decay=cfg.weight_decay, seed=cfg.seed, checkpoint_dir=ckpt, checkpoint_every=cfg.checkpoint_every,
            validation=validation, progress=cfg.progress,
        )  # fmt: skip
        composition.save(tmp / COMPOSITION_FILE)
        (tmp / "train_log.json").write_text(json.dumps({"steps": rec["history"], "validation": rec["validation"]}, indent=1))
        val = rec["validation"]
        log.info("train: validation loss %.4f (base) → %.4f (composition)", val[0]["loss"], val[-1]["loss"])
        return {
            "steps": rec["steps"], "windows": rec["windows"], "positions": rec["positions"], "validation": val,
            "train_seconds": round(time.time() - started, 1), "parameters": composition.num_parameters(), "spec": spec.card_fields(),
        }  # fmt: skip

    rec = run_stage("train", cfg.work / "train", fp, produce)
    shutil.rmtree(cfg.work / "train-checkpoints", ignore_errors=True)  # the finished composition supersedes them
    return rec


def load_trained(cfg: ComposeConfig, spec=None):
    from memories.calm.composition import COMPOSITION_FILE, Composition

    require(cfg.work / "train", "train stage", "`memserve memory compose`")
    return Composition.load(cfg.work / "train" / COMPOSITION_FILE, spec or composition_spec(cfg), cfg.name)


def _decoder_identity(cfg: ComposeConfig) -> dict | None:
    if not cfg.decoder_memory:
        return None
    from memories.artifact import read_card

    card = read_card(cfg.decoder_memory, Path(cfg.decoder_memory).name)
    return {"content": card.content_sha256, "lambda": card.weight, "temperature": card.temperature, "embeddings": card.embeddings}


def stage_evaluate(cfg: ComposeConfig, models: Models | None = None, spec=None) -> dict:
    """Test perplexity of base, augment, composition (and base + ``--decoder-memory``); report + plot."""
    from memories.calm.evaluate import evaluate_systems, load_decoder_memory, write_report

    spec = spec or composition_spec(cfg)
    train = require(cfg.work / "train", "train stage", "`memserve memory compose`")
    corpus = require(cfg.work / "corpus", "corpus stage", "`memserve memory compose`")
    fp = fingerprint(train=train["fingerprint"], corpus=corpus["fingerprint"], decoder=_decoder_identity(cfg), context=cfg.context, stride=cfg.stride)

    def produce(tmp: Path) -> dict:
        m = models or Models(cfg)
        composition = load_trained(cfg, spec).to(next(m.base.parameters()).device).eval()
        decoder = load_decoder_memory(cfg.decoder_memory, m.base, load_base_tokenizer(cfg)) if cfg.decoder_memory else None
        stream, mask = load_split(cfg, "test")
        result = evaluate_systems(m.base, m.augment, composition, stream, cfg.context, cfg.stride, mask, decoder, cfg.progress)
        log_file = json.loads((cfg.work / "train" / "train_log.json").read_text())
        report = {
            **result,
            "completion_only": mask is not None,
            "context": cfg.context,
            "stride": cfg.stride,
            "decoder_memory": str(Path(cfg.decoder_memory).resolve()) if cfg.decoder_memory else None,
            "training": {**{k: train.get(k) for k in ("steps", "windows", "positions", "train_seconds", "parameters")}, "history": log_file["steps"], "validation": log_file["validation"]},
        }
        write_report(tmp, report)
        log.info("evaluate: test ppl %s", ", ".join(f"{k} {v:.3f}" for k, v in result["test"].items()))
        return {k: report[k] for k in ("test", "positions", "completion_only", "decoder_memory") if k in report} | {k: result[k] for k in ("decoder_lambda", "decoder_temperature") if k in result}

    return run_stage("evaluate", cfg.work / "evaluate", fp, produce)


def stage_package(cfg: ComposeConfig, spec=None) -> Path:
    """OUT/NAME from the train and evaluate stages, checked with the server's own checks before it appears."""
    from memories.calm.composition import COMPOSITION_FILE
    from memories.calm.package import package_calm
    from memories.routing import profile_from_corpus_stage

    spec = spec or composition_spec(cfg)
    corpus = require(cfg.work / "corpus", "corpus stage", "`memserve memory compose`")
    train = require(cfg.work / "train", "train stage", "`memserve memory compose`")
    ev = require(cfg.work / "evaluate", "evaluate stage", "`memserve memory compose`")
    test = ev["test"]
    metrics = {
        "test_ppl_base": test["base"],
        "test_ppl_augment": test["augment"],
        "test_ppl_composition": test["composition"],
        **({"test_ppl_decoder_memory": test["decoder_memory"], "decoder_memory": Path(ev["decoder_memory"]).name, "decoder_lambda": ev.get("decoder_lambda"), "decoder_temperature": ev.get("decoder_temperature")} if "decoder_memory" in test else {}),
        "test_positions": ev["positions"],
        "completion_only": ev["completion_only"],
        "validation_loss_base": train["validation"][0]["loss"],
        "validation_loss_composition": train["validation"][-1]["loss"],
        "epochs": cfg.epochs,
        "steps": train["steps"],
        "lr": cfg.lr,
        "gate_lr": cfg.gate_lr,
        "batch": cfg.batch,
        "context": cfg.context,
        "stride": cfg.stride,
        "composition_parameters": train["parameters"],
        "train_seconds": train["train_seconds"],
        "compose_seconds": round(sum(r.get("seconds", 0.0) for r in (corpus, train, ev)), 1),  # the stages' own work, the same on a re-run
    }
    s = corpus["summary"]
    corpus_summary = {k: s[k] for k in ("spec", "description", "documents", "splits") if k in s} | ({"scored": s["scored"]} if "scored" in s else {})
    tok = load_base_tokenizer(cfg)
    return package_calm(
        cfg.artifact, name=cfg.name, domain=cfg.domain or cfg.name,
        description=cfg.description or f"calm memory: {Path(cfg.augment).name} composed into {Path(cfg.base).name}, trained on {cfg.corpus}",
        base=cfg.base, augment=cfg.augment, base_tokenizer=tok, spec=spec, composition_file=cfg.work / "train" / COMPOSITION_FILE,
        corpus_summary=corpus_summary, metrics=metrics, routing=profile_from_corpus_stage(cfg.work / "corpus", tok),
    )  # fmt: skip


# --- the whole command --------------------------------------------------------------------


def compose(cfg: ComposeConfig, models: Models | None = None) -> Path | None:
    """Run every stage (skipping up-to-date ones); return OUT/NAME (None when ``stop_after`` stopped it).

    ``models``: a ``Models(cfg, base=..., augment=...)`` holding models already in memory (default: loaded from
    ``cfg.base`` / ``cfg.augment`` when a stage has work to do).
    """
    from memories.artifact import write_json_atomic

    set_threads(cfg.threads)
    spec, _ = check_inputs(cfg)
    models = models or Models(cfg)  # loaded by the first stage that has work to do, then shared
    step = Stages(cfg.stop_after)

    try:
        step("corpus", lambda: stage_corpus(cfg))
        step("train", lambda: stage_train(cfg, models, spec))
        step("evaluate", lambda: stage_evaluate(cfg, models, spec))
        path = step("package", lambda: stage_package(cfg, spec))
    except StopAfter:
        return None
    write_json_atomic(cfg.work / "compose.json", {"config": asdict(cfg), "seconds": {**step.timings, "total": step.total()}})
    return path


__all__ = [
    "ComposeConfig", "ComposeInputError", "Models", "STAGES", "check_inputs", "check_decoder_memory", "composition_spec", "compose",
    "load_split", "load_trained", "stage_corpus", "stage_train", "stage_evaluate", "stage_package",
]  # fmt: skip
