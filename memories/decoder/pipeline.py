"""The memory build, stage by stage: corpus → datastore → index → heldout → targets → train → evaluate → package.

Layout of a build with ``--out OUT --name NAME``:

    OUT/NAME/                 the memory artifact (HF dir + tokenizer + memory.json)
    OUT/work/NAME/corpus/     token streams per split (.npy) + corpus summary
    OUT/work/NAME/datastore/shard-III-of-NNN/   keys (fp16), values, positions
    OUT/work/NAME/index/      faiss index + merged values
    OUT/work/NAME/heldout/    base log-probs, query keys' neighbours for validation/test; tuned kNN-LM
    OUT/work/NAME/targets/    sparse kNN distributions per training position
    OUT/work/NAME/train/      trained memory (HF dir) + loss log; checkpoints in train-checkpoints/
    OUT/work/NAME/evaluate/   report.json, report.md, ppl_vs_lambda.png

Each stage directory carries ``stage.json`` with the fingerprint of its inputs
and options (see ``memories.stage``); a re-run skips every stage whose
fingerprint is unchanged and resumes training from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from memories.corpus import SPLITS, stage_corpus as corpus_stage
from memories.stage import StageError, Stages, StopAfter, fingerprint, is_complete, require, run_stage, skipped, stage_info
from memories.stage import base_identity, set_threads

log = logging.getLogger("memserve.memory")


@dataclass
class BuildConfig:
    base: str
    corpus: str
    name: str
    out: str
    domain: str | None = None
    description: str = ""
    text_field: str = "text"
    # corpus
    max_tokens: int = 200_000  # training tokens (datastore rows + 1)
    eval_tokens: int = 20_000  # per split, validation and test
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    # windows
    context: int = 512
    stride: int = 256
    # datastore / index / targets
    layer: int = -1
    shard: int = 0
    shards: int = 1
    flat_max: int = 2_000_000
    train_sample: int = 200_000
    nprobe: int = 32
    k: int = 1024
    knn_temperature: float | None = None  # None: the kNN-LM temperature tuned on validation
    top: int = 64
    # training
    layers: int = 0  # 0: the whole base; N: a cut to N layers (memories.decoder.train.memory_layer_ids)
    init: str = "ends"  # which base layers a cut keeps
    epochs: int = 2
    lr: float = 1e-4
    beta: float = 0.5
    accumulate: int = 2
    warmup: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    embeddings: str = "own"  # "base": a thin memory, its embedding and head the base's, frozen and not stored
    bf16: bool = False  # training under bf16 autocast where the hardware has native bf16
    work_root: str | None = None  # default OUT/work
    # runtime only (never part of a fingerprint)
    threads: int = 0
    progress: bool = True
    stop_after: str | None = None  # for tests and manual runs: stop after this stage

    @property
    def work(self) -> Path:
        return Path(self.work_root or Path(self.out) / "work") / self.name

    @property
    def artifact(self) -> Path:
        return Path(self.out) / self.name


STAGES = ("corpus", "datastore", "index", "heldout", "targets", "train", "evaluate", "package")


def _vocab_size(base: str) -> int:
    return int(json.loads((Path(base) / "config.json").read_text())["vocab_size"])


# --- stages -------------------------------------------------------------------------------


def stage_corpus(cfg: BuildConfig) -> dict:
    """The corpus stage every kind's build shares (``memories.corpus.stage_corpus``): token streams per split under WORK/corpus."""
    return corpus_stage(cfg)


def _streams(cfg: BuildConfig, splits=SPLITS) -> dict[str, np.ndarray]:
    d = cfg.work / "corpus"
    require(d, "corpus stage", "`memserve memory datastore` (or build)")
    return {s: np.load(d / f"{s}.npy") for s in splits}


def _shard_dir(cfg: BuildConfig, shard: int, shards: int) -> Path:
    return cfg.work / "datastore" / f"shard-{shard:03d}-of-{shards:03d}"


def stage_datastore(cfg: BuildConfig, corpus_info: dict, shards: list[int] | None = None, model=None) -> list[dict]:
    from memories.base_model import load_base
    from memories.decoder.datastore import build_datastore
    from memories.distributed import world

    tokens = _streams(cfg, ["train"])["train"]
    records = []
    for shard in shards if shards is not None else [cfg.shard]:
        fp = fingerprint(corpus=corpus_info["fingerprint"], base=base_identity(cfg.base), context=cfg.context, stride=cfg.stride, layer=cfg.layer, shard=shard, shards=cfg.shards)

        def produce(tmp: Path, shard=shard) -> dict:
            nonlocal model
            model = model or load_base(cfg.base, device=world().device)
            return build_datastore(model, tokens, tmp, cfg.context, cfg.stride, cfg.layer, shard, cfg.shards, cfg.progress)

        records.append(run_stage(f"datastore shard {shard + 1}/{cfg.shards}", _shard_dir(cfg, shard, cfg.shards), fp, produce))
    return records


def stage_index(cfg: BuildConfig) -> dict:
    from memories.decoder.index import build_index

    dirs = [_shard_dir(cfg, i, cfg.shards) for i in range(cfg.shards)]
    missing = [str(d) for d in dirs if stage_info(d) is None]
    if missing:
        raise StageError(f"datastore shards missing: {', '.join(missing)}: run `memserve memory datastore --shard i/{cfg.shards}` for each")
    fp = fingerprint(shards=[stage_info(d)["fingerprint"] for d in dirs], flat_max=cfg.flat_max, train_sample=cfg.train_sample, nprobe=cfg.nprobe, seed=cfg.seed)
    return run_stage("index", cfg.work / "index", fp, lambda tmp: build_index(dirs, tmp, cfg.flat_max, cfg.train_sample, cfg.nprobe, cfg.seed, cfg.progress))


def stage_heldout(cfg: BuildConfig, model=None) -> dict:
    from memories.base_model import load_base
    from memories.distributed import world
    from memories.decoder.heldout import build_heldout

    index = require(cfg.work / "index", "index stage", "`memserve memory index`")
    corpus = require(cfg.work / "corpus", "corpus stage", "`memserve memory datastore`")
    from memories.mixture import LAMBDA_GRID

    fp = fingerprint(index=index["fingerprint"], corpus=corpus["fingerprint"], base=base_identity(cfg.base), context=cfg.context, stride=cfg.stride, layer=cfg.layer, k=cfg.k, lambdas=LAMBDA_GRID)

    def produce(tmp: Path) -> dict:
        m = model or load_base(cfg.base, device=world().device)
        streams = _streams(cfg, ["validation", "test"])
        return build_heldout(m, streams, cfg.work / "index", tmp, cfg.context, cfg.stride, cfg.layer, cfg.k, _vocab_size(cfg.base), cfg.progress)

    return run_stage("heldout", cfg.work / "heldout", fp, produce)


def stage_targets(cfg: BuildConfig) -> dict:
    from memories.decoder.targets import build_targets

    index = require(cfg.work / "index", "index stage", "`memserve memory index`")
    heldout = require(cfg.work / "heldout", "heldout stage", "`memserve memory targets`")
    temperature = cfg.knn_temperature or heldout["knnlm"]["temperature"]
    fp = fingerprint(index=index["fingerprint"], k=cfg.k, temperature=temperature, top=cfg.top)
    return run_stage(
        "targets",
        cfg.work / "targets",
        fp,
        lambda tmp: build_targets(cfg.work / "index", index["shards"], tmp, cfg.k, temperature, cfg.top, _vocab_size(cfg.base), progress=cfg.progress),
    )


def stage_train(cfg: BuildConfig) -> dict:
    """Train the memory; under torchrun every process trains (DDP) and rank 0 writes the stage."""
    from memories.distributed import barrier, world
    from memories.decoder.targets import heldout_targets, load_targets
    from memories.decoder.train import train_memory

    targets = require(cfg.work / "targets", "targets stage", "`memserve memory targets`")
    corpus = require(cfg.work / "corpus", "corpus stage", "`memserve memory datastore`")
    opts = {k: getattr(cfg, k) for k in ("layers", "init", "context", "stride", "epochs", "lr", "beta", "accumulate", "warmup", "weight_decay", "seed", "bf16")}
    thin = {"embeddings": "base"} if cfg.embeddings == "base" else {}  # absent for full memories: their fingerprints stay as they were
    fp = fingerprint(targets=targets["fingerprint"], corpus=corpus["fingerprint"], base=base_identity(cfg.base), **opts, **thin)
    ckpt = cfg.work / "train-checkpoints" / fp[:16]

    def produce(tmp: Path | None) -> dict:
        streams = _streams(cfg, ["train", "validation"])
        tokens = streams["train"]
        ids, probs = load_targets(cfg.work / "targets")
        if len(ids) != len(tokens) - 1:
            raise StageError(f"targets have {len(ids)} rows but the training stream has {len(tokens) - 1} positions: rebuild targets")
        heldout = (streams["validation"], *heldout_targets(cfg.work / "heldout", "validation", targets["temperature"], targets["top"], _vocab_size(cfg.base)))
        rec = train_memory(cfg.base, tokens, ids, probs, tmp, ckpt, heldout=heldout, progress=cfg.progress, frozen_embeddings=bool(thin), **opts)
        knn = require(cfg.work / "heldout", "heldout stage", "`memserve memory targets`")["knnlm"]
        last = rec["history"][-1]
        log.info(
            "train: validation KL(kNN‖memory) %.4f → %.4f; memory-alone ppl %.2f → %.2f (base + kNN-LM %.2f)",
            rec["history"][0]["heldout_kl"], last["heldout_kl"], rec["history"][0]["heldout_ppl"], last["heldout_ppl"], knn["validation_ppl"],
        )
        return {**rec, "knnlm_validation_ppl": knn["validation_ppl"]}

    w = world()
    if w.main:
        rec = run_stage("train", cfg.work / "train", fp, produce)
        shutil.rmtree(cfg.work / "train-checkpoints", ignore_errors=True)  # the finished model supersedes them
    elif is_complete(cfg.work / "train", fp):
        rec = {**(stage_info(cfg.work / "train") or {}), "skipped": True}
    else:
        rec = produce(None)
    barrier()
    return rec


def stage_evaluate(cfg: BuildConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from memories.decoder.evaluate import evaluate_memory

    train = require(cfg.work / "train", "train stage", "`memserve memory train`")
    heldout = require(cfg.work / "heldout", "heldout stage", "`memserve memory targets`")
    from memories.decoder.evaluate import MEMORY_TEMPERATURES
    from memories.mixture import LAMBDA_GRID

    fp = fingerprint(train=train["fingerprint"], heldout=heldout["fingerprint"], lambdas=LAMBDA_GRID, temperatures=MEMORY_TEMPERATURES)

    def produce(tmp: Path) -> dict:
        from memories.distributed import world

        memory = AutoModelForCausalLM.from_pretrained(str(cfg.work / "train"), dtype=__import__("torch").float32).to(world().device).eval()
        streams = _streams(cfg, ["validation", "test"])
        return evaluate_memory(memory, streams, cfg.work / "heldout", heldout, tmp, cfg.context, cfg.stride, _vocab_size(cfg.base), cfg.progress)

    return run_stage("evaluate", cfg.work / "evaluate", fp, produce)


def stage_package(cfg: BuildConfig, timings: dict | None = None) -> Path:
    from memories.decoder.package import package_memory

    evaluation = require(cfg.work / "evaluate", "evaluate stage", "`memserve memory evaluate`")
    corpus = require(cfg.work / "corpus", "corpus stage", "`memserve memory datastore`")
    index = require(cfg.work / "index", "index stage", "`memserve memory index`")
    return package_memory(cfg, corpus["summary"], evaluation, index, timings or {})


# --- whole build and demo ------------------------------------------------------------------


def stage_tokens(name: str, corpus: dict | None, epochs: int) -> int | None:
    """Tokens a stage works through, for its tokens/s: the train split, or validation + test."""
    splits = (corpus or {}).get("summary", {}).get("splits", {})
    if not splits:
        return None
    train = splits.get("train", {}).get("tokens", 0)
    held = sum(splits.get(s, {}).get("tokens", 0) for s in ("validation", "test"))
    return {"corpus": train + held, "datastore": train, "index": train, "heldout": held, "targets": train, "train": train * epochs, "evaluate": held}.get(name)


def build(cfg: BuildConfig) -> Path | None:
    """Run every stage (skipping up-to-date ones); return the artifact directory.

    Under torchrun (``python -m torch.distributed.run --nproc_per_node N -m memories build ...``)
    the datastore shards are dealt out to the processes (at least one shard
    each) and training is data-parallel; every other stage runs on rank 0 and
    the other ranks return None.
    """
    from memories.distributed import barrier, on_main, world

    w = world()
    set_threads(cfg.threads)
    if cfg.shards < w.size:
        cfg.shards = w.size

    def describe(name, rec, seconds):
        if not w.main:
            return None
        tokens = stage_tokens(name, corpus if name != "corpus" else rec, cfg.epochs)
        reused = skipped(rec)
        rate = f" ({tokens / seconds:,.0f} tokens/s)" if tokens and seconds > 0 and not reused else ""
        return f"{'reused' if reused else 'done'} in {seconds:.1f}s{rate}"

    step = Stages(cfg.stop_after, describe)
    timings = step.timings
    corpus = None

    def datastore() -> list[dict]:
        records = stage_datastore(cfg, corpus, shards=list(range(cfg.shards))[w.rank :: w.size])
        barrier()  # the index needs every rank's shards
        return records

    try:
        corpus = step("corpus", lambda: on_main(lambda: stage_corpus(cfg)))
        step("datastore", datastore)
        step("index", lambda: on_main(lambda: stage_index(cfg)))
        step("heldout", lambda: on_main(lambda: stage_heldout(cfg)))
        step("targets", lambda: on_main(lambda: stage_targets(cfg)))
        step("train", lambda: stage_train(cfg))
        step("evaluate", lambda: on_main(lambda: stage_evaluate(cfg)))
        timings["total_before_package"] = step.total()
        path = step("package", lambda: stage_package(cfg, timings) if w.main else None)
    except StopAfter:
        return None
    if not w.main:
        return None
    timings["total"] = step.total()
    from memories.artifact import write_json_atomic

    write_json_atomic(cfg.work / "build.json", {"config": asdict(cfg), "seconds": timings, "processes": w.size})
    return path


# Demo memories: sized to build in about 15 minutes per domain on a 2-core CPU
# with the 135M default base; the whole base as memory, one epoch (measured; see memories/README.md).
DEMO_OPTIONS = dict(max_tokens=40_000, eval_tokens=5_000, context=512, stride=512, layers=0, epochs=1, accumulate=2, lr=1e-4)
DEMO_DESCRIPTIONS = {
    "biomed": "Biomedical abstracts (PubMed) memory for the embedded SmolLM2-135M base",
    "finance": "Business and finance news (BBC) memory for the embedded SmolLM2-135M base",
    "law": "Licences, EULAs and contracts memory for the embedded SmolLM2-135M base",
}


def demo(out: str | Path | None = None, domains=("biomed", "finance", "law"), threads: int = 0, progress=True, **overrides) -> dict[str, dict]:
    """Build the three demo memories for the default base into ``out`` (default: the serve folder).

    Work files go to ``<cache>/work/`` so the output folder holds only memories.
    """
    from memories.base_model import cache_dir, default_base

    out = Path(out) if out else cache_dir() / "memories"
    base = default_base()
    results = {}
    for d in domains:
        t = time.time()
        cfg = BuildConfig(base=str(base), corpus=f"demo:{d}", name=d, out=str(out), domain=d, description=DEMO_DESCRIPTIONS[d], work_root=str(cache_dir() / "work"), threads=threads, progress=progress, **{**DEMO_OPTIONS, **overrides})
        path = build(cfg)
        results[d] = {"path": str(path), "seconds": round(time.time() - t, 1)}
        log.info("demo %s: %s in %.0fs", d, path, time.time() - t)
    return results

