"""``memserve memory build --kind lora``, stage by stage: corpus → train → evaluate → package.

A PEFT LoRA trained on a corpus with the causal-LM loss, packaged as a lora
memory (docs/CONTRACT.md, "lora memory artifact"). Layout with ``--out OUT
--name NAME`` (work files under ``OUT/work/NAME``, or ``--work-root``):

    OUT/NAME/            the lora memory: adapter_config.json, adapter_model.safetensors, memory.json, routing.json
    WORK/corpus/         token streams per split (.npy) + summary: ``memories.corpus.stage_corpus``, every build's
    WORK/train/          the adapter as PEFT's save_pretrained writes it + train_log.json (loss per step)
    WORK/evaluate/       report.json, report.md: test and validation perplexity of the base and base + LoRA

The corpus stage is the one the decoder and calm builds run, so with the same
corpus spec, caps, fractions, ``--context`` and ``--stride`` the test
positions and the base's test perplexity are those of a decoder or calm
memory's report. Training runs over the train split's windows
(``memories.windows``) with AdamW and ``memories.training.lr_schedule``; only
scored positions of a window count, as in evaluation. ``--minutes`` stops
training after that many CPU minutes of this process (``time.process_time``:
all its threads), for comparisons at the same compute budget. Every stage is a
``memories.stage`` stage (a re-run skips what is up to date). Packaging checks
the artifact with the server's own ``read_lora_card`` / ``check_lora_compatible``
before it appears under its name.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from memories.base_model import load_base
from memories.decoder.pipeline import BuildConfig
from memories.stage import StageError, Stages, StopAfter, base_identity, fingerprint, publish_dir, require, run_stage, set_threads

log = logging.getLogger("memserve.memory")

_BUILD = BuildConfig(base="", corpus="", name="", out="")  # the decoder build's defaults, shared where they must agree
HINT = "`memserve memory build --kind lora`"


class LoraInputError(StageError):
    """Inputs that cannot make a lora memory: the message says which and why."""


@dataclass
class LoraBuildConfig:
    base: str
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
    # the adapter
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")
    # training
    epochs: int = 1
    lr: float = 5e-4
    batch: int = 4  # windows per optimiser step
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    minutes: float | None = None  # CPU-minute budget for training (None: every step)
    # runtime only (never part of a fingerprint)
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
    return {f.name for f in fields(LoraBuildConfig)}


# --- inputs -------------------------------------------------------------------------------


def base_config(cfg: LoraBuildConfig) -> dict:
    if not Path(cfg.base).is_dir():
        raise LoraInputError(f"--base {cfg.base!r} is not a directory")
    try:
        return json.loads((Path(cfg.base) / "config.json").read_text())
    except FileNotFoundError:
        raise LoraInputError(f"--base {cfg.base!r} is not a Hugging Face model directory (no config.json)") from None
    except json.JSONDecodeError as e:
        raise LoraInputError(f"--base {cfg.base!r}: config.json is not JSON ({e})") from None


def load_base_tokenizer(cfg: LoraBuildConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.base)
    except Exception as e:
        raise LoraInputError(f"--base {cfg.base!r}: no readable tokenizer ({e})") from None


def check_inputs(cfg: LoraBuildConfig) -> dict:
    """Everything that can be refused before any model is loaded; returns the base's config."""
    from memories.lora.artifact import MAX_LORA_SCALE, MODULES, SUPPORTED_BASES

    conf = base_config(cfg)
    arch = (conf.get("architectures") or [""])[0]
    if arch not in SUPPORTED_BASES:
        raise LoraInputError(f"--base {cfg.base!r} is {arch or 'of no architecture'}; lora memories are served for {', '.join(SUPPORTED_BASES)}")
    if not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise LoraInputError(f"--rank must be at least 1, got {cfg.rank}")
    if not math.isfinite(cfg.alpha) or cfg.alpha <= 0:
        raise LoraInputError(f"--alpha must be a positive number, got {cfg.alpha}")
    if cfg.alpha / cfg.rank > MAX_LORA_SCALE:
        raise LoraInputError(f"--alpha {cfg.alpha:g} / --rank {cfg.rank} = {cfg.alpha / cfg.rank:g}: memserve serves LoRA scales up to {MAX_LORA_SCALE:g}")
    bad = [t for t in cfg.targets if t not in MODULES]
    if not cfg.targets or bad:
        raise LoraInputError(f"--targets {','.join(cfg.targets) or '(none)'}: each must be one of {', '.join(MODULES)}")
    for key in ("epochs", "batch", "context", "stride"):
        if getattr(cfg, key) < 1:
            raise LoraInputError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.stride > cfg.context:
        raise LoraInputError(f"--stride {cfg.stride} must not exceed --context {cfg.context}")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise LoraInputError(f"--minutes must be positive, got {cfg.minutes}")
    if not cfg.lr > 0:
        raise LoraInputError(f"--lr must be positive, got {cfg.lr}")
    load_base_tokenizer(cfg)
    return conf


def lora_config(cfg: LoraBuildConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def _base(cfg: LoraBuildConfig, base):
    if base is None:
        return load_base(cfg.base)
    return base() if callable(base) and not isinstance(base, torch.nn.Module) else base


def _stream(cfg: LoraBuildConfig, split: str) -> np.ndarray:
    d = cfg.work / "corpus"
    require(d, "corpus stage", HINT)
    return np.load(d / f"{split}.npy")


# --- stages -------------------------------------------------------------------------------


def stage_corpus(cfg: LoraBuildConfig) -> dict:
    from memories.corpus import stage_corpus as corpus_stage

    return corpus_stage(cfg)


def _train_options(cfg: LoraBuildConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("rank", "alpha", "targets", "context", "stride", "epochs", "lr", "batch", "warmup", "weight_decay", "seed", "minutes")}


def window_loss(model, tokens: np.ndarray, w) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of a window's scored positions (those evaluation scores it on), and their count."""
    from memories.perplexity import token_logprobs

    ids = torch.as_tensor(tokens[w.begin : w.end], dtype=torch.long)[None]
    labels = torch.as_tensor(tokens[w.first + 1 : w.end + 1], dtype=torch.long)
    logits = model(input_ids=ids).logits[0, w.offset :]
    return -token_logprobs(logits, labels).sum(), w.scored


def train_lora(model, tokens: np.ndarray, cfg: LoraBuildConfig) -> dict:
    """AdamW over the LoRA parameters of a PEFT ``model``; ``batch`` windows per step, shuffled per epoch, until done or out of ``minutes``."""
    from tqdm import tqdm

    from memories.training import lr_schedule
    from memories.windows import iter_windows

    windows = list(iter_windows(len(tokens), cfg.context, cfg.stride))
    per_epoch = math.ceil(len(windows) / cfg.batch)
    total = per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(total, cfg.warmup))
    rng = np.random.default_rng(cfg.seed)
    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    started, cpu0 = time.time(), time.process_time()
    history: list[dict] = []
    step, stopped = 0, False
    model.train()
    bar = tqdm(total=total, desc="train lora", unit="step", disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(windows))
        for b in range(per_epoch):
            chosen = [windows[i] for i in order[b * cfg.batch : (b + 1) * cfg.batch]]
            count = sum(w.scored for w in chosen)
            nll = 0.0
            for w in chosen:
                loss, _ = window_loss(model, tokens, w)
                (loss / count).backward()
                nll += float(loss.detach())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "epoch": epoch, "loss": round(nll / count, 5), "lr": opt.param_groups[0]["lr"]})
            bar.update(1)
            if budget is not None and time.process_time() - cpu0 >= budget and step < total:
                stopped = True
                break
        if stopped:
            break
    bar.close()
    model.eval()
    if stopped:
        log.info("train: --minutes %g reached after %d of %d steps", cfg.minutes, step, total)
    return {
        "steps": step, "planned_steps": total, "windows": len(windows), "positions": int(len(tokens) - 1), "history": history,
        "stopped_by_budget": stopped, "train_seconds": round(time.time() - started, 1), "train_cpu_minutes": round((time.process_time() - cpu0) / 60, 3),
    }  # fmt: skip


def stage_train(cfg: LoraBuildConfig, base=None) -> dict:
    """A fresh LoRA (seeded) on the base, trained on the train split; saved with PEFT's save_pretrained.

    ``base``: the base model, or a callable returning it (called only when there is work to do); default: loaded here.
    """
    from peft import get_peft_model

    corpus = require(cfg.work / "corpus", "corpus stage", HINT)
    fp = fingerprint(corpus=corpus["fingerprint"], base=base_identity(cfg.base), **_train_options(cfg))

    def produce(tmp: Path) -> dict:
        torch.manual_seed(cfg.seed)
        model = get_peft_model(_base(cfg, base), lora_config(cfg))
        rec = train_lora(model, _stream(cfg, "train"), cfg)
        model.save_pretrained(str(tmp))
        trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        model.unload()  # the base modules back as they were (a caller's base stays the base)
        (tmp / "train_log.json").write_text(json.dumps({"steps": rec.pop("history")}, indent=1))
        hist = json.loads((tmp / "train_log.json").read_text())["steps"]
        log.info("train: %d steps, loss %.4f → %.4f in %.1fs", rec["steps"], hist[0]["loss"], hist[-1]["loss"], rec["train_seconds"])
        return {**rec, "parameters": trainable, "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"]}

    return run_stage("train", cfg.work / "train", fp, produce)


def stage_evaluate(cfg: LoraBuildConfig, base=None) -> dict:
    """Validation and test perplexity of the base and base + LoRA (``memories.perplexity``, the evaluation windows); report.json + report.md."""
    from peft import PeftModel

    from memories.perplexity import model_logprobs, perplexity

    train = require(cfg.work / "train", "train stage", HINT)
    corpus = require(cfg.work / "corpus", "corpus stage", HINT)
    fp = fingerprint(train=train["fingerprint"], corpus=corpus["fingerprint"], context=cfg.context, stride=cfg.stride)

    def produce(tmp: Path) -> dict:
        model = PeftModel.from_pretrained(_base(cfg, base), str(cfg.work / "train")).eval()
        result: dict[str, dict] = {"test": {}, "validation": {}}
        for split in ("validation", "test"):
            stream = _stream(cfg, split)
            with model.disable_adapter():
                result[split]["base"] = perplexity(model_logprobs(model, stream, cfg.context, cfg.stride, f"{split} base", progress=cfg.progress)[1.0])
            result[split]["lora"] = perplexity(model_logprobs(model, stream, cfg.context, cfg.stride, f"{split} lora", progress=cfg.progress)[1.0])
            result[f"{split}_positions"] = int(len(stream) - 1)
        model.unload()
        report = {
            **result, "context": cfg.context, "stride": cfg.stride, "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets),
            "training": {k: train.get(k) for k in ("steps", "planned_steps", "windows", "positions", "parameters", "first_loss", "last_loss", "stopped_by_budget", "train_seconds", "train_cpu_minutes")},
        }  # fmt: skip
        write_report(tmp, report)
        log.info("evaluate: test ppl base %.3f, base + lora %.3f", result["test"]["base"], result["test"]["lora"])
        return {k: report[k] for k in ("test", "validation", "test_positions", "validation_positions")}

    return run_stage("evaluate", cfg.work / "evaluate", fp, produce)


def write_report(out: Path, report: dict) -> None:
    from memories.artifact import write_json_atomic

    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report))


def report_markdown(r: dict) -> str:
    tr = r["training"]
    lines = [
        "# LoRA memory evaluation",
        "",
        f"Windows of {r['context']} tokens, stride {r['stride']}; test positions scored: {r['test_positions']}, validation: {r['validation_positions']}.",
        "",
        "| system | validation ppl | test ppl |",
        "|---|---:|---:|",
        f"| base alone | {r['validation']['base']:.3f} | {r['test']['base']:.3f} |",
        f"| base + LoRA (r {r['rank']}, alpha {r['alpha']:g}, {', '.join(r['targets'])}) | {r['validation']['lora']:.3f} | {r['test']['lora']:.3f} |",
        "",
        f"Training: {tr['steps']} of {tr['planned_steps']} steps over {tr['windows']} windows ({tr['positions']} positions)"
        f"{', stopped by --minutes' if tr.get('stopped_by_budget') else ''}; loss {tr['first_loss']:.4f} → {tr['last_loss']:.4f}; "
        f"{tr['train_seconds']:.1f} s ({tr['train_cpu_minutes']:.2f} CPU minutes); LoRA parameters {tr['parameters']}.",
    ]
    return "\n".join(lines) + "\n"


def stage_package(cfg: LoraBuildConfig) -> Path:
    """OUT/NAME: the adapter PEFT saved, memory.json and routing.json, checked with the server's own checks before it appears."""
    from memories.artifact import FORMAT_VERSION, MEMORY_JSON, tokenizer_sha256, write_json_atomic
    from memories.lora.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_lora_compatible, read_lora_card
    from memories.routing import profile_from_corpus_stage, write_profile

    corpus = require(cfg.work / "corpus", "corpus stage", HINT)
    train = require(cfg.work / "train", "train stage", HINT)
    ev = require(cfg.work / "evaluate", "evaluate stage", HINT)
    tok = load_base_tokenizer(cfg)
    s = corpus["summary"]
    card = {
        "format": FORMAT_VERSION,
        "kind": "lora",
        "name": cfg.name,
        "domain": cfg.domain or cfg.name,
        "description": cfg.description or f"lora memory for {Path(cfg.base).name} trained on {cfg.corpus}",
        "base_model": Path(cfg.base).name,
        "tokenizer_sha256": tokenizer_sha256(tok),
        "rank": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": sorted(cfg.targets),
        "corpus": {k: s[k] for k in ("spec", "description", "documents", "splits") if k in s},
        "metrics": {
            "test_ppl_base": ev["test"]["base"],
            "test_ppl_lora": ev["test"]["lora"],
            "validation_ppl_base": ev["validation"]["base"],
            "validation_ppl_lora": ev["validation"]["lora"],
            "test_positions": ev["test_positions"],
            "context": cfg.context,
            "stride": cfg.stride,
            "epochs": cfg.epochs,
            "steps": train["steps"],
            "planned_steps": train["planned_steps"],
            "stopped_by_budget": train["stopped_by_budget"],
            "minutes": cfg.minutes,
            "lr": cfg.lr,
            "batch": cfg.batch,
            "lora_parameters": train["parameters"],
            "train_seconds": train["train_seconds"],
            "train_cpu_minutes": train["train_cpu_minutes"],
            "build_seconds": round(sum(r.get("seconds", 0.0) for r in (corpus, train, ev)), 1),  # the stages' own work, the same on a re-run
        },
    }
    final = cfg.artifact
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(cfg.work / "train" / f, tmp / f)
    write_json_atomic(tmp / MEMORY_JSON, card)
    write_profile(tmp, profile_from_corpus_stage(cfg.work / "corpus", tok))  # routing.json: what domain "auto" reads
    for f in tmp.iterdir():  # temp-file writers create 0600 files; a memory is meant to be shared
        f.chmod(0o644)
    check_lora_compatible(read_lora_card(tmp, cfg.name), tok, base_config(cfg), cfg.rank)  # the server's own checks, before publishing
    publish_dir(tmp, final)
    return final


# --- the whole command --------------------------------------------------------------------


def build_lora(cfg: LoraBuildConfig, base=None) -> Path | None:
    """Run every stage (skipping up-to-date ones); return OUT/NAME (None when ``stop_after`` stopped it).

    ``base``: the base model already in memory (fp32); default: loaded once, by the first stage with work to do.
    """
    from memories.artifact import write_json_atomic

    set_threads(cfg.threads)
    check_inputs(cfg)
    holder = {"base": base}

    def model():
        if holder["base"] is None:
            holder["base"] = load_base(cfg.base)
        return holder["base"]

    step = Stages(cfg.stop_after)

    try:
        step("corpus", lambda: stage_corpus(cfg))
        step("train", lambda: stage_train(cfg, model))
        step("evaluate", lambda: stage_evaluate(cfg, model))
        path = step("package", lambda: stage_package(cfg))
    except StopAfter:
        return None
    write_json_atomic(cfg.work / "build.json", {"config": asdict(cfg), "seconds": {**step.timings, "total": step.total()}})
    return path


__all__ = [
    "LoraBuildConfig", "LoraInputError", "STAGES", "build_lora", "check_inputs", "config_fields", "stage_corpus", "stage_train",
    "stage_evaluate", "stage_package", "train_lora",
]  # fmt: skip
