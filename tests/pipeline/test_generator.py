"""The LoRA generator pipeline on a tiny random Llama and tiny synthetic domains built here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pipeline.conftest import make_tiny_llama, make_tokenizer

VOCABS = {  # each domain: its own favourite words, plus some shared filler
    "alpha": [f"a{i}" for i in range(12)],
    "beta": [f"b{i}" for i in range(12)],
    "gamma": [f"c{i}" for i in range(12)],
    "delta": [f"d{i}" for i in range(12)],
}
SHARED = [f"s{i}" for i in range(10)]


def _docs(domain: str, n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(f"{domain}{seed}")
    words = VOCABS[domain]
    return [" ".join(rng.choice(words) if rng.random() < 0.7 else rng.choice(SHARED) for _ in range(rng.randint(30, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    corpora = {}
    for d in VOCABS:
        folder = root / "corpora" / d
        folder.mkdir(parents=True)
        for i, text in enumerate(_docs(d)):
            (folder / f"{i:03d}.txt").write_text(text)
        corpora[d] = str(folder)
    tok = make_tokenizer([t for d in VOCABS for t in _docs(d)])
    base = root / "base"
    make_tiny_llama(len(tok), layers=3, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    return {"root": root, "base": base, "corpora": corpora}


def tiny_cfg(tiny, work: Path, **over):
    from memories.lora.pipeline import GeneratorBuildConfig

    c = tiny["corpora"]
    opts = dict(
        base=str(tiny["base"]), out=str(work / "generator-out"), work=str(work / "work"),
        train_domains=(c["alpha"], c["beta"], c["gamma"]), heldout_domains=(c["delta"],),
        validation_fraction=0.1, test_fraction=0.15, eval_tokens=400, eval_window=32,
        rank=2, alpha=4.0, layers=2, lora_steps=6, lora_batch=2, lora_window=32, lora_windows=8, lora_lr=1e-2, lora_warmup=1,
        checkpoint_from=2, bf16=False, prompts=4, prompt_tokens=16, generator_steps=30, generator_batch=4, max_prompts=16, eval_prompts=8,
        threads=1, progress=False,
    )  # fmt: skip
    opts.update(over)
    return GeneratorBuildConfig(**opts)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    from memories.lora.pipeline import build

    work = tmp_path_factory.mktemp("build")
    cfg = tiny_cfg(tiny, work)
    path = build(cfg)
    return cfg, path


def test_tokenise_roundtrip_is_exact():
    from memories.lora.weights import Layout, Standardiser, tokenise, untokenise

    layout = Layout.build([4, 5], {"q_proj": (100, 130), "v_proj": (100, 64)}, rank=3, chunk=32)
    torch.manual_seed(0)
    adapter = {}
    for s in layout.slots:
        shape = (7, 3, s.width) if s.matrix == "A" else (7, s.width, 3)
        adapter[s.key] = torch.randn(shape)
    grid = tokenise(layout, adapter)
    assert grid.shape == (7, layout.tokens, 3 * 32)
    back = untokenise(layout, grid)
    assert set(back) == set(adapter)
    for k in adapter:
        assert torch.equal(back[k], adapter[k])
    mask = layout.mask()
    assert not grid[:, ~mask].any()  # padding stays zero
    st = Standardiser.fit(grid, mask)
    assert torch.allclose(st.invert(st.apply(grid)) * mask, grid, atol=1e-5)


def test_generator_overfits_tiny_collection():
    from memories.lora.train_generator import GeneratorRecipe, train_generator
    from memories.lora.weights import Layout

    layout = Layout.build([0], {"q_proj": (64, 64)}, rank=2, chunk=32)
    g = torch.Generator().manual_seed(0)
    collection = [{"grids": torch.randn(3, layout.tokens, layout.token_dim, generator=g) + i, "prompts": torch.randn(6, 16, 32, generator=g) + 3 * i} for i in range(3)]
    rec = train_generator(layout, collection, GeneratorRecipe(prompts=4, prompt_tokens=16, steps=150, batch=6, lr=3e-3, warmup=10), progress=False)
    h = rec["history"]
    assert np.mean(h[-20:]) < 0.5 * np.mean(h[:5])


def test_build_end_to_end(built):
    cfg, path = built
    from memories.lora.generate import load_generator

    report = json.loads((Path(cfg.work) / "evaluate" / "report.json").read_text())
    (row,) = report["domains"]
    for v in ("base", "mean", "generated", "trained"):
        assert np.isfinite(row["ppl"][v]) and row["ppl"][v] > 1
    assert row["ppl"]["trained"] < row["ppl"]["base"]  # the upper-bound LoRA learned its domain
    assert (Path(cfg.work) / "evaluate" / "report.md").read_text().count("|") > 10
    gen = load_generator(path)
    assert gen.sha256 == (path / "generator.sha256").read_text().strip()
    ckpt = Path(cfg.work) / "lora"
    assert len(list(ckpt.iterdir())) == 4  # 3 training + 1 held-out (upper bound)


def test_resume_skips_done_and_redoes_interrupted(built, tiny, caplog):
    import logging
    import shutil

    from memories.lora.domains import slug
    from memories.lora.pipeline import build

    cfg, _ = built
    target = Path(cfg.work) / "lora" / slug(cfg.train_domains[1])
    # an interrupted stage: only a partial folder left behind, the stage itself gone
    partial = target.parent / f".{target.name}.partial"
    shutil.copytree(target, partial)
    (partial / "stage.json").unlink()
    shutil.rmtree(target)
    with caplog.at_level(logging.INFO, logger="memserve.memory"):
        build(cfg)
    log = caplog.text
    assert "domain " in log and "skipped" in log
    redone = [r for r in caplog.records if r.getMessage().startswith("lora ") and "skipped" in r.getMessage()]
    assert len(redone) == 3  # the other three LoRAs were reused
    assert (target / "stage.json").exists() and not partial.exists()
    assert "evaluate: up to date" in log or "evaluate" in log


def test_generated_adapter_loads_in_peft(built, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from memories.lora.generate import generate_memory, load_generator

    cfg, path = built
    gen = load_generator(path)
    prompts = _docs("delta", 5, seed=9)
    card = generate_memory(gen, prompts, "delta-gen", tmp_path / "delta-gen")
    out = tmp_path / "delta-gen"
    meta = json.loads((out / "memory.json").read_text())
    assert meta["kind"] == "lora" and meta["generator"] == gen.sha256 and meta["prompts"]["count"] == 5
    assert card["rank"] == 2 and meta["target_modules"] == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base(cfg)), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert sd, "PEFT loaded no LoRA weights"
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    for k, v in saved.items():
        loaded = sd[k.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, v)
        assert v.shape == ((2, 128) if ".lora_A." in k else (128, 2))
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in saved}
    assert layers == {1, 2}  # the top 2 of 3 layers
    # the PEFT model's output equals the base with the generator's ΔW merged
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    from memories.lora.topstack import deltas_merged

    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_base(cfg)), dtype=torch.float32)
        with deltas_merged(plain, gen.deltas(saved)):
            merged_logits = plain(input_ids=ids).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)


def tiny_base(cfg) -> Path:
    return Path(cfg.base)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args):
    """``memserve ...`` in this process (the same parser and code as the console script, without a second torch import)."""
    import contextlib
    import io

    from server.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        opts = build_parser().parse_args(list(args))
        rc = opts.func(opts) or 0
    return _Result(rc, out.getvalue(), err.getvalue())


def test_memory_generate_cli(built, tmp_path):
    cfg, path = built
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in _docs("delta", 6, seed=3)))
    r = _cli("memory", "generate", "--generator", str(path), "--prompts", str(prompts), "--name", "d1", "--out", str(tmp_path / "mem"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "mem" / "d1"
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "memory.json", "routing.json"}
    assert json.loads((out / "routing.json").read_text())["source"] == "prompts"  # the prompts make the routing profile
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2 and conf["task_type"] == "CAUSAL_LM"
    # a folder of .txt prompts works too
    folder = tmp_path / "pf"
    folder.mkdir()
    for i, t in enumerate(_docs("alpha", 3)):
        (folder / f"{i}.txt").write_text(t)
    r = _cli("memory", "generate", "--generator", str(path), "--prompts", str(folder), "--name", "a1", "--out", str(tmp_path / "mem"))
    assert r.returncode == 0, r.stderr


def test_bad_prompts_are_clear_errors(built, tmp_path):
    from memories.lora.generate import PromptError, generate_memory, load_generator, read_prompts, validate_prompts

    cfg, path = built
    gen = load_generator(path)
    with pytest.raises(PromptError, match="at least 1"):
        generate_memory(gen, [], "x", tmp_path / "x")
    with pytest.raises(PromptError, match="at most 16"):
        generate_memory(gen, ["a0 a1"] * 17, "x", tmp_path / "x")
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        validate_prompts(["a0", "   "])
    with pytest.raises(PromptError, match="characters"):
        validate_prompts(["x" * 30_000])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(PromptError, match="not UTF-8"):
        read_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert read_prompts(empty) == []
    r = _cli("memory", "generate", "--generator", str(path), "--prompts", str(empty), "--name", "e", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "at least 1" in r.stderr
    r = _cli("memory", "generate", "--generator", str(path), "--prompts", str(bad), "--name", "e", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "not UTF-8" in r.stderr
    assert not (tmp_path / "m" / "e").exists()
    # a tampered generator is refused
    broken = tmp_path / "gen-copy"
    import shutil

    shutil.copytree(path, broken)
    (broken / "generator.json").write_text((broken / "generator.json").read_text().replace('"rank": 2', '"rank": 3'))
    from memories.lora.generate import GeneratorError

    with pytest.raises(GeneratorError, match="do not match"):
        load_generator(broken)


def test_subdomain_specs_are_checked():
    from memories.corpus import CorpusError, load_corpus
    from memories.lora.domains import DEFAULT_HELDOUT, DEFAULT_TRAIN, slug

    with pytest.raises(CorpusError, match="sub-domains are"):
        load_corpus("demo:arxiv/cs")
    assert len(DEFAULT_TRAIN) >= 16 and len(DEFAULT_HELDOUT) >= 4 and not set(DEFAULT_TRAIN) & set(DEFAULT_HELDOUT)
    assert len({slug(s) for s in DEFAULT_TRAIN + DEFAULT_HELDOUT}) == len(DEFAULT_TRAIN) + len(DEFAULT_HELDOUT)
