"""The generator build, stage by stage: domains → encode → lora → generator → evaluate.

Layout under the work folder ``WORK`` (``--work``):

    WORK/domains/SLUG/     token streams per split + the first train documents (prompts for evaluation)
    WORK/encode/SLUG/      states entering the first LoRA layer for the domain's training windows
                           (their first ``prompt_tokens`` tokens are the generator's prompt embeddings)
    WORK/lora/SLUG/        checkpoints.safetensors (every kept step, stacked), the final LoRA as a PEFT dir, losses
    WORK/generator/        the trained generator (also copied to ``--out``)
    WORK/evaluate/         report.json, report.md, ppl_heldout.png

Every stage (one per domain for the first three) is a ``memories.stage``
stage: written into a temporary folder, renamed into place with the
fingerprint of its inputs and options, skipped when that fingerprint is
already there. A killed run redoes only the stage it was in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from memories.lora.collection import LoraRecipe
from memories.lora.domains import DEFAULT_HELDOUT, DEFAULT_TRAIN, load_domain, slug
from memories.lora.train_generator import GeneratorRecipe
from memories.stage import StageError, Stages, StopAfter, fingerprint, require, run_stage

log = logging.getLogger("memserve.generator")


@dataclass
class GeneratorBuildConfig:
    base: str
    out: str  # the generator directory
    work: str
    train_domains: tuple[str, ...] = DEFAULT_TRAIN
    heldout_domains: tuple[str, ...] = DEFAULT_HELDOUT
    text_field: str = "text"
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    eval_tokens: int = 4096  # test tokens per held-out domain
    eval_window: int = 256
    # LoRA recipe (collection and upper bound)
    rank: int = 4
    alpha: float = 8.0
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: int = 6
    lora_steps: int = 30
    lora_batch: int = 4
    lora_window: int = 128
    lora_windows: int = 48  # distinct training windows per domain (encoded once, cycled through)
    lora_lr: float = 2e-3
    lora_warmup: int = 3
    checkpoint_from: int = 10
    checkpoint_every: int = 1
    seed: int = 0
    bf16: bool = True
    # generator
    prompts: int = 16
    prompt_tokens: int = 64
    generator_steps: int = 600
    generator_batch: int = 8
    generator_lr: float = 1e-3
    targets_from: int = 0  # generator targets: checkpoints from this step on (0: every kept checkpoint)
    max_prompts: int = 128
    eval_prompts: int = 32  # train documents of a held-out domain given to the generator
    # runtime only
    threads: int = 0
    progress: bool = True
    stop_after: str | None = None

    def recipe(self) -> LoraRecipe:
        return LoraRecipe(
            rank=self.rank, alpha=self.alpha, modules=tuple(self.modules), layers=self.layers, steps=self.lora_steps, batch=self.lora_batch,
            window=self.lora_window, lr=self.lora_lr, warmup=self.lora_warmup, checkpoint_from=self.checkpoint_from,
            checkpoint_every=self.checkpoint_every, seed=self.seed, bf16=self.bf16,
        )  # fmt: skip

    def generator_recipe(self) -> GeneratorRecipe:
        return GeneratorRecipe(prompts=self.prompts, prompt_tokens=self.prompt_tokens, steps=self.generator_steps, batch=self.generator_batch, lr=self.generator_lr, seed=self.seed)

    @property
    def root(self) -> Path:
        return Path(self.work)

    def all_domains(self) -> list[str]:
        return list(self.train_domains) + list(self.heldout_domains)


STAGES = ("domains", "encode", "lora", "generator", "evaluate")


def check_domains(cfg: GeneratorBuildConfig) -> None:
    if len(set(cfg.train_domains)) != len(cfg.train_domains) or len(set(cfg.heldout_domains)) != len(cfg.heldout_domains):
        raise StageError("a domain is listed twice")
    both = set(cfg.train_domains) & set(cfg.heldout_domains)
    if both:
        raise StageError(f"domains both trained on and held out: {', '.join(sorted(both))}")
    if len(cfg.train_domains) < 2:
        raise StageError("the generator needs at least 2 training domains (16 or more for held-out generalisation)")
    if not cfg.heldout_domains:
        raise StageError("no held-out domain to evaluate on")
    if cfg.prompt_tokens > cfg.lora_window:
        raise StageError(f"--prompt-tokens {cfg.prompt_tokens} must not exceed --lora-window {cfg.lora_window}")


# --- stages -------------------------------------------------------------------------------


def stage_domain(cfg: GeneratorBuildConfig, spec: str, tokenizer, tok_sha: str) -> dict:
    train_tokens = cfg.lora_windows * cfg.lora_window
    fp = fingerprint(spec=spec, tokenizer=tok_sha, train_tokens=train_tokens, eval_tokens=cfg.eval_tokens, fractions=[cfg.validation_fraction, cfg.test_fraction], text_field=cfg.text_field, prompts=cfg.max_prompts)

    def produce(tmp: Path) -> dict:
        from memories.lora.generate import MAX_PROMPT_CHARS

        d = load_domain(spec, tokenizer, train_tokens, cfg.eval_tokens, cfg.validation_fraction, cfg.test_fraction, cfg.text_field)
        for split, stream in d.streams.items():
            np.save(tmp / f"{split}.npy", stream)
        texts = [t[:MAX_PROMPT_CHARS] for t in d.train_texts[: cfg.max_prompts]]
        (tmp / "prompts.json").write_text(json.dumps(texts))
        return {"spec": spec, "description": d.description, "identity": d.identity, "tokens": {s: int(len(v)) for s, v in d.streams.items()}}

    return run_stage(f"domain {spec}", cfg.root / "domains" / slug(spec), fp, produce)


def stage_encode(cfg: GeneratorBuildConfig, spec: str, domain: dict, base_model, base_id: dict) -> dict:
    from memories.lora.topstack import cut_windows, num_layers, states_entering

    first = cfg.recipe().layer_ids(num_layers(base_model))[0]
    fp = fingerprint(domain=domain["fingerprint"], base=base_id, layer=first, window=cfg.lora_window, windows=cfg.lora_windows, bf16=cfg.bf16)

    def produce(tmp: Path) -> dict:
        from safetensors.torch import save_file
        from tqdm import tqdm

        stream = np.load(cfg.root / "domains" / slug(spec) / "train.npy")
        windows = cut_windows(stream, cfg.lora_window, cfg.lora_windows)
        if len(windows) == 0:
            raise StageError(f"domain {spec!r}: its train split has fewer than {cfg.lora_window + 1} tokens")
        with tqdm(total=len(windows), desc=f"encode {spec.removeprefix('demo:')}", unit="window", disable=not cfg.progress, leave=False) as bar:
            states = states_entering(base_model, windows, first, bf16=cfg.bf16, progress=bar)
        save_file({"states": states.contiguous(), "windows": torch.as_tensor(windows)}, str(tmp / "states.safetensors"))
        return {"spec": spec, "layer": first, "windows": int(len(windows)), "tokens": int(windows.size)}

    return run_stage(f"encode {spec}", cfg.root / "encode" / slug(spec), fp, produce)


def _load_states(cfg: GeneratorBuildConfig, spec: str) -> tuple[torch.Tensor, np.ndarray]:
    from safetensors.torch import load_file

    t = load_file(str(cfg.root / "encode" / slug(spec) / "states.safetensors"))
    return t["states"], t["windows"].numpy()


def stage_lora(cfg: GeneratorBuildConfig, spec: str, encoded: dict, base_model) -> dict:
    from memories.lora.collection import train_lora

    recipe = cfg.recipe()
    fp = fingerprint(encode=encoded["fingerprint"], recipe=asdict(recipe))

    def produce(tmp: Path) -> dict:
        from safetensors.torch import save_file

        states, windows = _load_states(cfg, spec)
        rec = train_lora(base_model, windows, states, recipe, progress=cfg.progress, label=spec.removeprefix("demo:"))
        save_file({k: v.contiguous() for k, v in rec["checkpoints"].items()}, str(tmp / "checkpoints.safetensors"))
        save_file({k: v.contiguous() for k, v in rec["final"].items()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(_peft_config(cfg, recipe, base_model), indent=2))
        return {"spec": spec, "steps": rec["steps"], "losses": rec["losses"], "train_seconds": round(rec["seconds"], 2), "encode_seconds": encoded.get("seconds", 0.0)}

    return run_stage(f"lora {spec}", cfg.root / "lora" / slug(spec), fp, produce)


def _peft_config(cfg: GeneratorBuildConfig, recipe: LoraRecipe, base_model) -> dict:
    from memories.lora.topstack import num_layers

    return {
        "base_model_name_or_path": str(Path(cfg.base).resolve()), "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": recipe.rank,
        "lora_alpha": recipe.alpha, "lora_dropout": 0.0, "target_modules": list(recipe.modules),
        "layers_to_transform": recipe.layer_ids(num_layers(base_model)), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    }  # fmt: skip


def _layout(cfg: GeneratorBuildConfig, base_model):
    from memories.lora.topstack import attention_shapes, num_layers
    from memories.lora.weights import Layout

    recipe = cfg.recipe()
    return Layout.build(recipe.layer_ids(num_layers(base_model)), attention_shapes(base_model, list(recipe.modules)), recipe.rank, chunk=64)


def stage_generator(cfg: GeneratorBuildConfig, loras: dict[str, dict], encoded: dict[str, dict], base_model, tok_sha: str, base_id: dict) -> dict:
    from safetensors.torch import load_file

    from memories.lora.generate import save_generator
    from memories.lora.topstack import num_layers
    from memories.lora.train_generator import train_generator
    from memories.lora.weights import tokenise

    recipe, grecipe = cfg.recipe(), cfg.generator_recipe()
    fp = fingerprint(
        loras=[loras[s]["fingerprint"] for s in cfg.train_domains], encoded=[encoded[s]["fingerprint"] for s in cfg.train_domains],
        recipe=asdict(grecipe), max_prompts=cfg.max_prompts, **({"targets_from": cfg.targets_from} if cfg.targets_from else {}),
    )  # fmt: skip

    def produce(tmp: Path) -> dict:
        layout = _layout(cfg, base_model)
        collection = []
        for spec in cfg.train_domains:
            ckpts = load_file(str(cfg.root / "lora" / slug(spec) / "checkpoints.safetensors"))
            steps = np.asarray(loras[spec]["steps"])
            keep = torch.as_tensor(np.flatnonzero(steps >= cfg.targets_from)) if (steps >= cfg.targets_from).any() else torch.as_tensor([len(steps) - 1])
            ckpts = {k: v[keep] for k, v in ckpts.items()}
            states, _ = _load_states(cfg, spec)
            collection.append({"grids": tokenise(layout, ckpts), "prompts": states})
        rec = train_generator(layout, collection, grecipe, progress=cfg.progress)
        config = {
            "format": 1,
            "kind": "lora-generator",
            "base_model": Path(cfg.base).name,
            "base_path": str(Path(cfg.base).resolve()),
            "base_identity": base_id,
            "tokenizer_sha256": tok_sha,
            "lora": {"rank": recipe.rank, "alpha": recipe.alpha, "modules": list(recipe.modules), "layer_ids": recipe.layer_ids(num_layers(base_model))},
            "encoder": {"layer": recipe.layer_ids(num_layers(base_model))[0], "prompts": grecipe.prompts, "prompt_tokens": grecipe.prompt_tokens, "bf16": cfg.bf16},
            "layout": layout.to_dict(),
            "hyperconv": rec["config"].to_dict(),
            "limits": {"max_prompts": cfg.max_prompts},
            "training": {"domains": list(cfg.train_domains), "recipe": rec["recipe"], "lora_recipe": asdict(recipe), "targets_from": cfg.targets_from, "checkpoints": sum(len(c["grids"]) for c in collection)},
        }
        sha = save_generator(tmp, config, rec["model"], rec["standardiser"], rec["input_norm"])
        (tmp / "loss_history.json").write_text(json.dumps(rec["history"]))
        h = rec["history"]
        return {"sha256": sha, "loss_first": float(np.mean(h[:20])), "loss_last": float(np.mean(h[-20:])), "train_seconds": round(rec["seconds"], 2), "checkpoints": config["training"]["checkpoints"]}

    return run_stage("generator", cfg.root / "generator", fp, produce)


def publish_generator(cfg: GeneratorBuildConfig) -> Path:
    """Copy the generator's files to ``--out`` (a temporary sibling renamed into place)."""
    from memories.lora.generate import GENERATOR_JSON, GENERATOR_SHA, GENERATOR_WEIGHTS
    from memories.stage import publish_dir

    out = Path(cfg.out)
    src = cfg.root / "generator"
    if out.resolve() == src.resolve():
        return out
    if (out / GENERATOR_SHA).is_file() and (out / GENERATOR_SHA).read_text() == (src / GENERATOR_SHA).read_text():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in (GENERATOR_JSON, GENERATOR_WEIGHTS, GENERATOR_SHA):
        shutil.copy2(src / name, tmp / name)
    publish_dir(tmp, out)
    return out


def stage_evaluate(cfg: GeneratorBuildConfig, generator: dict, loras: dict[str, dict], domains: dict[str, dict], base_model) -> dict:
    from safetensors.torch import load_file

    from memories.lora.evaluate import write_report
    from memories.lora.generate import load_generator
    from memories.lora.topstack import cut_windows, deltas_merged, states_entering, top_perplexity
    from memories.lora.weights import lora_deltas

    recipe = cfg.recipe()
    fp = fingerprint(
        generator=generator["sha256"], loras=[loras[s]["fingerprint"] for s in cfg.all_domains()], domains=[domains[s]["fingerprint"] for s in cfg.heldout_domains],
        window=cfg.eval_window, prompts=cfg.eval_prompts,
    )  # fmt: skip

    def produce(tmp: Path) -> dict:
        gen = load_generator(cfg.root / "generator", base=cfg.base)
        gen._base = base_model  # the same frozen weights: no second copy in memory
        gen.tokenizer()  # loaded once, as in a server that keeps the generator: not part of a generation's time
        finals = [lora_deltas(load_file(str(cfg.root / "lora" / slug(s) / "adapter_model.safetensors")), recipe.scaling) for s in cfg.train_domains]
        mean = {k: torch.stack([f[k] for f in finals]).mean(0) for k in finals[0]}
        first = gen.first_layer
        rows = []
        for spec in cfg.heldout_domains:
            d = cfg.root / "domains" / slug(spec)
            windows = cut_windows(np.load(d / "test.npy"), cfg.eval_window)
            if len(windows) == 0:
                raise StageError(f"held-out domain {spec!r}: test split shorter than --eval-window {cfg.eval_window}")
            states = states_entering(base_model, windows, first)
            prompts = json.loads((d / "prompts.json").read_text())[: cfg.eval_prompts]
            t, c = time.time(), time.process_time()
            adapter = gen.adapter(prompts)
            gen_seconds, gen_cpu = time.time() - t, time.process_time() - c
            trained = lora_deltas(load_file(str(cfg.root / "lora" / slug(spec) / "adapter_model.safetensors")), recipe.scaling)
            ppl = {}
            for variant, deltas in (("base", None), ("mean", mean), ("generated", gen.deltas(adapter)), ("trained", trained)):
                with deltas_merged(base_model, deltas):
                    ppl[variant] = round(top_perplexity(base_model, first, states, windows), 4)
            lrec = loras[spec]
            train_seconds = float(lrec["train_seconds"]) + float(lrec.get("encode_seconds") or 0.0)
            # CPU seconds (all threads) are what an idle machine would need; on a shared one wall times swing with the neighbours
            enc = require(cfg.root / "encode" / slug(spec), "encode stage", "`memserve generator build`")
            train_cpu = float(lrec.get("cpu_seconds") or 0.0) + float(enc.get("cpu_seconds") or 0.0)
            rows.append({
                "domain": spec, "test_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "prompts": len(prompts), "ppl": ppl,
                "generate_seconds": round(gen_seconds, 3), "train_seconds": round(train_seconds, 2), "speedup": round(train_seconds / max(gen_seconds, 1e-9), 1),
                "generate_cpu_seconds": round(gen_cpu, 3), "train_cpu_seconds": round(train_cpu, 2), "speedup_cpu": round(train_cpu / max(gen_cpu, 1e-9), 1),
            })  # fmt: skip
            log.info("held-out %s: ppl %s; generate %.2fs vs train %.1fs", spec, ppl, gen_seconds, train_seconds)
        setup = {
            "base": Path(cfg.base).name, "train_domains": list(cfg.train_domains), "heldout_domains": list(cfg.heldout_domains),
            "lora_recipe": asdict(recipe), "generator_recipe": asdict(cfg.generator_recipe()), "eval_window": cfg.eval_window,
            "generator_sha256": generator["sha256"], "threads": torch.get_num_threads(),
        }  # fmt: skip
        report = write_report(tmp, rows, {"setup": setup})
        return {"verdict": report["verdict"], "rows": rows}

    return run_stage("evaluate", cfg.root / "evaluate", fp, produce)


# --- whole build ----------------------------------------------------------------------------


def build(cfg: GeneratorBuildConfig) -> Path | None:
    """Run every stage, skipping up-to-date ones; return the generator directory (``cfg.out``)."""
    from transformers import AutoTokenizer

    from memories.artifact import tokenizer_sha256, write_json_atomic
    from memories.base_model import load_base
    from memories.stage import base_identity, set_threads

    check_domains(cfg)
    set_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    tok_sha = tokenizer_sha256(tokenizer)
    base_id = base_identity(cfg.base)
    base_model = load_base(cfg.base)

    step = Stages(cfg.stop_after, lambda name, rec, seconds: f"{seconds:.1f}s")

    try:
        domains = step("domains", lambda: {s: stage_domain(cfg, s, tokenizer, tok_sha) for s in cfg.all_domains()})
        encoded = step("encode", lambda: {s: stage_encode(cfg, s, domains[s], base_model, base_id) for s in cfg.all_domains()})
        loras = step("lora", lambda: {s: stage_lora(cfg, s, encoded[s], base_model) for s in _progress(cfg, cfg.all_domains(), "LoRA collection")})
        generator = step("generator", lambda: stage_generator(cfg, loras, encoded, base_model, tok_sha, base_id))
        step("evaluate", lambda: stage_evaluate(cfg, generator, loras, domains, base_model))
    except StopAfter:
        return None
    path = publish_generator(cfg)
    seconds = {**step.timings, "total": step.total()}
    write_json_atomic(cfg.root / "build.json", {"config": asdict(cfg), "seconds": seconds})
    log.info("generator ready at %s (report: %s) in %.0fs", path, cfg.root / "evaluate" / "report.md", seconds["total"])
    return path


def _progress(cfg: GeneratorBuildConfig, items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="domain", disable=not cfg.progress)


# --- demo -----------------------------------------------------------------------------------

# Sized for the 2-core CPU machine class with the 135M default base (measured: see memories/README.md).
DEMO_OPTIONS: dict = dict(lora_steps=64, lora_batch=4, lora_windows=48, checkpoint_from=32, targets_from=48, generator_steps=500, eval_tokens=4096)


def default_generator_dir() -> Path:
    """Where ``memserve generator demo`` puts the generator (``<MEMSERVE_CACHE>/generator``)."""
    from memories.base_model import cache_dir

    return cache_dir() / "generator"


def demo(out: str | os.PathLike | None = None, work: str | os.PathLike | None = None, threads: int = 0, progress: bool = True, **overrides) -> Path | None:
    from memories.base_model import cache_dir, default_base

    cfg = GeneratorBuildConfig(
        base=str(default_base()), out=str(out or default_generator_dir()), work=str(work or cache_dir() / "work" / "generator"),
        threads=threads, progress=progress, **{**DEMO_OPTIONS, **overrides},
    )  # fmt: skip
    return build(cfg)


def config_fields() -> dict:
    return {f.name: f for f in fields(GeneratorBuildConfig)}
