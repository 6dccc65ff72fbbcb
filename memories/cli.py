"""``memserve memory ...`` sub-commands that build memories offline: ``build --kind decoder|calm|lora``, the decoder build's stages one by one, demo, generate (a lora memory from prompts) and compare (every kind on the same text).

``server/cli.py`` calls ``add_memory_commands(subparsers)`` on the ``memory``
parser; every sub-command sets ``func`` (taking the argparse Namespace).
All stage commands take the same options as ``build`` so that a stage run on
another machine computes the same fingerprints and finds the same work folder
(``OUT/work/NAME``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from memories.decoder.pipeline import BuildConfig
from memories.flags import add_corpus_arguments, add_threads_argument


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


# each kind's build command; ``build --kind K`` runs it with that kind's own flags (``route_kind``)
KIND_BUILDS = {"decoder": "build", "calm": "compose", "lora": "build-lora"}


def route_kind(argv: list[str]) -> list[str]:
    """``build --kind K ...`` as the command that builds kind K: ``build --kind calm`` is ``compose``, ``--kind lora`` ``build-lora``, flags and --help their own."""
    if argv[:1] != ["build"]:
        return argv
    rest = argv[1:]
    for i, arg in enumerate(rest):
        if arg == "--kind" and i + 1 < len(rest) and rest[i + 1] in KIND_BUILDS:
            return [KIND_BUILDS[rest[i + 1]], *rest[:i], *rest[i + 2 :]]
        if arg.startswith("--kind=") and arg[7:] in KIND_BUILDS:
            return [KIND_BUILDS[arg[7:]], *rest[:i], *rest[i + 1 :]]
    return argv  # no --kind (a decoder memory), or one argparse will refuse naming the choices


def _add_build_options(p: argparse.ArgumentParser, with_kind: bool = False) -> None:
    d = BuildConfig(base="", corpus="", name="", out="")
    g = p.add_argument_group("what to build")
    if with_kind:
        g.add_argument(
            "--kind", choices=tuple(KIND_BUILDS), default="decoder",
            help="decoder: the flags below; calm: a calm memory, with its own flags (`memserve memory build --kind calm --help`); "
            "lora: a PEFT LoRA trained on the corpus, with its own flags (`memserve memory build --kind lora --help`; "
            "`memserve memory generate` makes one from prompts instead) (default: %(default)s)",
        )  # fmt: skip
    g.add_argument("--base", required=True, help="base model: a Hugging Face directory")
    g.add_argument("--corpus", required=True, help="text file, .jsonl file, folder of .txt files, or demo:biomed|law|finance")
    g.add_argument("--name", required=True, help="memory name (also the artifact folder name)")
    g.add_argument("--out", required=True, help="output folder: the memory goes to OUT/NAME, work files to OUT/work/NAME")
    g.add_argument("--domain", help="domain label for memory.json (default: NAME)")
    g.add_argument("--description", default="", help="free text for memory.json (default: one naming the base and the corpus)")
    g.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text (default %(default)s)")
    add_corpus_arguments(p, d)
    g = p.add_argument_group("datastore, index, kNN targets")
    g.add_argument("--layer", type=int, default=d.layer, help="decoder layer whose MLP input is the key; negative counts from the end (default %(default)s: the last)")
    g.add_argument("--shards", type=int, default=d.shards, help="number of datastore shards (default %(default)s)")
    g.add_argument("--flat-max", type=int, default=d.flat_max, help="exact index up to this many rows, IVF-PQ above (default %(default)s)")
    g.add_argument("--nprobe", type=int, default=d.nprobe, help="IVF lists searched per query when the index is IVF-PQ (default %(default)s)")
    g.add_argument("--k", type=int, default=d.k, help="neighbours per position (default %(default)s, capped by datastore size)")
    g.add_argument("--knn-temperature", type=float, default=None, help="kNN softmax temperature (default: tuned on validation)")
    g.add_argument("--top", type=int, default=d.top, help="entries kept per sparse target (default %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--layers", type=int, default=d.layers, help="memory depth in decoder layers; 0 = the whole base (default %(default)s)")
    g.add_argument("--init", choices=("ends", "first"), default=d.init, help="which base layers the memory starts from: the first ⌈N/2⌉ and last ⌊N/2⌋ (ends) or the first N (default %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training windows (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default %(default)s)")
    g.add_argument("--beta", type=float, default=d.beta, help="weight of KL(p_kNN || p_mem) vs. cross-entropy (default %(default)s)")
    g.add_argument("--accumulate", type=int, default=d.accumulate, help="windows per optimiser step (default %(default)s)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of steps (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for the order of training windows and the index's training sample (default %(default)s)")
    g.add_argument("--bf16", action="store_true", help="train under bf16 autocast where the CPU/GPU has native bf16 (fp32 elsewhere)")
    g.add_argument("--embeddings", choices=("own", "base"), default=d.embeddings, help="base: a thin memory, its token embedding and head the base's, frozen in training, left out of the artifact and shared at serving (default %(default)s)")
    g = p.add_argument_group("runtime")
    g.add_argument("--work-root", default=None, help="folder for work files (default OUT/work)")
    add_threads_argument(g)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    names = {f.name for f in fields(BuildConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = BuildConfig(**given)
    cfg.progress = not getattr(args, "no_progress", False)
    if getattr(args, "shard_spec", None):
        cfg.shard, cfg.shards = args.shard_spec
    return cfg


def _run(stage: str):
    def run(args: argparse.Namespace) -> int:
        from memories.decoder import pipeline as pl

        cfg = config_from_args(args)
        pl.set_threads(cfg.threads)
        if stage == "build":
            path = pl.build(cfg)
            print(f"memory ready: {path}")
            print(f"serve it with: memserve serve --memory {cfg.name}={path}")
            return 0
        if stage == "datastore":
            corpus = pl.stage_corpus(cfg)
            recs = pl.stage_datastore(cfg, corpus)
            print(json.dumps([{k: r.get(k) for k in ("stage", "rows", "skipped")} for r in recs]))
        elif stage == "targets":
            pl.stage_heldout(cfg)
            pl.stage_targets(cfg)
        elif stage == "package":
            print(f"memory ready: {pl.stage_package(cfg)}")
        else:
            getattr(pl, f"stage_{stage}")(cfg)
        return 0

    return run


def _run_demo(args: argparse.Namespace) -> int:
    from memories.decoder.pipeline import demo

    results = demo(args.out, tuple(args.domains.split(",")), threads=args.threads, progress=not args.no_progress)
    for d, r in results.items():
        print(f"{d}: {r['path']} ({r['seconds']:.0f} s)")
    return 0


HELP = {
    "build": "build a memory; --kind decoder (default) runs every stage: corpus → datastore → index → targets → train → evaluate → package",
    "datastore": "tokenize the corpus and store base keys/next tokens (one shard with --shard i/n)",
    "index": "merge datastore shards into a faiss index",
    "targets": "tune kNN-LM on validation and compute sparse kNN targets for every training position",
    "train": "train the memory on the kNN targets (resumes from the last epoch checkpoint)",
    "evaluate": "test perplexity: base, base + kNN-LM, base + memory; report.json/md + plot",
    "package": "write the memory artifact OUT/NAME (HF dir + tokenizer + memory.json)",
}


def add_memory_commands(subparsers) -> None:
    """Attach ``build``, the decoder build's stages, ``compose`` (= ``build --kind calm``), ``build-lora`` (= ``build --kind lora``), ``demo`` and ``generate`` to ``memserve memory``."""
    for name, text in HELP.items():
        p = subparsers.add_parser(name, help=text if name == "build" else f"decoder build stage: {text}", description=text)
        _add_build_options(p, with_kind=name == "build")
        if name == "datastore":
            p.add_argument("--shard", dest="shard_spec", type=_shard, default=None, help="build shard i of n (e.g. 0/4); default: the single shard 0/1")
        p.set_defaults(func=_run(name))
    from memories.calm.cli import add_compose_command

    add_compose_command(subparsers)
    p = subparsers.add_parser("demo", help="build the biomed, finance and law demo memories for the default base")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/memories, where `memserve serve` looks)")
    p.add_argument("--domains", default="biomed,finance,law", help="comma-separated subset (default %(default)s)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)
    from memories.lora.cli import add_build_lora_command, add_generate_command

    add_build_lora_command(subparsers)
    add_generate_command(subparsers)
    from memories.calm.augment import add_augment_command
    from memories.calm.demo import add_calm_demo_command

    add_augment_command(subparsers)
    add_calm_demo_command(subparsers)
    from memories.compare import add_compare_command

    add_compare_command(subparsers)


def main(argv=None) -> int:
    """``python -m memories ...``: the same commands without the server package's CLI."""
    parser = argparse.ArgumentParser(prog="python -m memories", description="build memories (memserve memory ...)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_memory_commands(sub)
    args = parser.parse_args(route_kind(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
