"""``memserve memory compose``: a calm memory from a base, an augmenting model and a corpus.

``memories/cli.py`` adds it next to ``build``. Bad inputs (directories,
tokenizers, connection counts, corpus specs) end with exit code 2 and one
line saying what is wrong, before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys

from memories.flags import add_corpus_arguments, add_threads_argument, positive

log = logging.getLogger("memserve.compose")


def _add_options(p: argparse.ArgumentParser) -> None:
    from memories.calm.pipeline import ComposeConfig

    d = ComposeConfig(base="", augment="", corpus="", name="", out="")
    g = p.add_argument_group("what to compose")
    g.add_argument("--base", required=True, help="base model m_B: a Hugging Face Llama directory with its tokenizer")
    g.add_argument("--augment", required=True, help="augmenting model m_A: a Hugging Face causal-LM directory using the base's tokenizer (e.g. a decoder memory's directory)")
    g.add_argument("--corpus", required=True, help="text file, .jsonl file (records with 'prompt' and 'completion': only completion tokens are scored), folder of .txt files, or demo:biomed|law|finance")
    g.add_argument("--name", required=True, help="memory name (also the artifact folder name)")
    g.add_argument("--out", required=True, help="output folder: the memory goes to OUT/NAME, work files to OUT/work/NAME")
    g.add_argument("--domain", help="domain label for memory.json (default: NAME)")
    g.add_argument("--description", default="", help="free text for memory.json (default: one naming both models and the corpus)")
    g.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text of plain .jsonl corpora (default %(default)s)")
    add_corpus_arguments(p, d, "corpus and windows (defaults as `memory build`, so the test split is a decoder memory's)")
    g = p.add_argument_group("composition")
    g.add_argument("--connections", type=positive, default=d.connections, help="cross-attention connections, spread evenly over both models' layers; at most the shallower model's depth (default %(default)s)")
    g.add_argument("--heads", type=int, default=d.heads, help="attention heads per connection; 0: the base's attention heads (default %(default)s)")
    g = p.add_argument_group("training (only the composition learns; both models are frozen)")
    g.add_argument("--epochs", type=positive, default=d.epochs, help="passes over the training windows (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate, linear warm-up then cosine decay (default %(default)s)")
    g.add_argument("--gate-lr", type=float, default=d.gate_lr, help="peak learning rate of the gates, same schedule; Adam moves each parameter by about its rate per step, and a gate's range (0..1) is far wider than a matrix entry's, so a larger rate opens the gates sooner (default %(default)s)")
    g.add_argument("--batch", type=positive, default=d.batch, help="windows per optimiser step (default %(default)s)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of the steps (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay of the projection matrices (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for the composition's initialisation and the window order (default %(default)s)")
    g.add_argument("--checkpoint-every", type=positive, default=d.checkpoint_every, help="steps between training checkpoints, besides every epoch's end (default %(default)s)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--decoder-memory", default=None, help="a decoder memory directory for the same base: its fused test perplexity (its own λ and temperature) joins the report (default: none)")
    g = p.add_argument_group("runtime")
    g.add_argument("--work-root", default=None, help="folder for work files (default OUT/work)")
    add_threads_argument(g)
    g.add_argument("--stop-after", choices=("corpus", "train", "evaluate"), default=None, help="stop after this stage (default: run every stage)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace):
    from memories.calm.pipeline import ComposeConfig, config_fields

    names = config_fields()
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return ComposeConfig(**given, progress=not args.no_progress)


def _run(args: argparse.Namespace) -> int:
    from memories.artifact import ArtifactError
    from memories.calm.pipeline import compose
    from memories.corpus import CorpusError
    from memories.stage import StageError

    cfg = config_from_args(args)
    try:
        path = compose(cfg)
    except (CorpusError, StageError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if path:
        print(f"calm memory ready: {path}\nreport: {cfg.work / 'evaluate' / 'report.md'}")
        print(f"serve it with: memserve serve --memory {cfg.name}={path}")
    return 0


HELP = "build a calm memory (the same as `build --kind calm`): compose a frozen augmenting model into the frozen base (CALM): corpus → train → evaluate → package (resumable)"


def add_compose_command(subparsers) -> None:
    """``compose`` under ``memserve memory``."""
    p = subparsers.add_parser("compose", help=HELP, description=HELP, prog="memserve memory build --kind calm")
    _add_options(p)
    p.set_defaults(func=_run)
