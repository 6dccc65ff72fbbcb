"""``memserve memory build --kind lora`` on a tiny base: a PEFT LoRA trained on the corpus, evaluated, packaged and accepted by the server's checks.

The base is the pipeline tests' random 3-layer Llama (conftest ``tiny_base``), so
a LoRA trained for a few dozen steps on the synthetic corpus must beat it on test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _args(base: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build", "--kind", "lora", "--base", str(base), "--corpus", str(corpus), "--name", "lora-test", "--out", str(out),
        "--max-tokens", "3000", "--eval-tokens", "600", "--validation-fraction", "0.08", "--test-fraction", "0.08",
        "--context", "64", "--stride", "32", "--rank", "8", "--alpha", "16", "--epochs", "2", "--lr", "1e-2", "--batch", "4",
        "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def lora_memory(tiny_base, synthetic_corpus, tmp_path_factory):
    from memories.cli import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lora-out")
    assert main(_args(tiny_base, synthetic_corpus, out)) == 0
    return out / "lora-test", out


def test_build_writes_a_lora_memory_the_server_accepts(lora_memory, tiny_base):
    from transformers import AutoTokenizer

    from memories.artifact import tokenizer_sha256
    from memories.kinds import check_any_compatible, read_any_card

    path, _ = lora_memory
    card = read_any_card(path, "lora-test")
    tok = AutoTokenizer.from_pretrained(tiny_base)
    check_any_compatible(card, tok, json.loads((tiny_base / "config.json").read_text()), 16)
    assert card.kind == "lora" and card.rank == 8 and card.target_modules == ("down_proj", "o_proj", "q_proj", "v_proj")
    meta = json.loads((path / "memory.json").read_text())
    assert meta["format"] == 1 and meta["kind"] == "lora" and meta["name"] == "lora-test" and meta["domain"] == "lora-test"
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tok) and meta["base_model"] == tiny_base.name
    assert meta["corpus"]["splits"]["train"]["tokens"] <= 3001 and meta["metrics"]["steps"] > 0 and meta["metrics"]["lora_parameters"] > 0
    assert (path / "routing.json").is_file()
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "memory.json", "routing.json"]


def test_report_shows_base_and_lora_test_perplexity(lora_memory):
    path, out = lora_memory
    report = json.loads((out / "work" / "lora-test" / "evaluate" / "report.json").read_text())
    test = report["test"]
    assert test["lora"] < 0.93 * test["base"], test  # the corpus's word statistics are learnable; the random base knows none
    md = (out / "work" / "lora-test" / "evaluate" / "report.md").read_text()
    assert "base alone" in md and "base + LoRA" in md and f"{test['lora']:.3f}" in md
    meta = json.loads((path / "memory.json").read_text())
    assert meta["metrics"]["test_ppl_lora"] == test["lora"] and meta["metrics"]["test_ppl_base"] == test["base"]


def test_packaged_adapter_is_the_evaluated_one(lora_memory, tiny_base):
    """The artifact loaded by PEFT onto the base scores the test split as the report says (the one perplexity formula)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import numpy as np

    from memories.perplexity import model_logprobs, perplexity

    path, out = lora_memory
    work = out / "work" / "lora-test"
    test = np.load(work / "corpus" / "test.npy")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), str(path)).eval()
    ppl = perplexity(model_logprobs(model, test, 64, 32, "test", progress=False)[1.0])
    assert ppl == pytest.approx(json.loads((work / "evaluate" / "report.json").read_text())["test"]["lora"], rel=1e-5)


def test_rerun_skips_finished_stages(lora_memory, tiny_base, synthetic_corpus, monkeypatch):
    from memories.cli import main
    from memories.lora import build

    _, out = lora_memory
    before = (out / "lora-test" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(build, "load_base", lambda cfg: pytest.fail("an up-to-date build loaded the base"))
    monkeypatch.setattr(build, "train_lora", lambda *a, **k: pytest.fail("an up-to-date build trained"))
    assert main(_args(tiny_base, synthetic_corpus, out)) == 0
    for stage in ("corpus", "train", "evaluate"):
        assert (out / "work" / "lora-test" / stage / "stage.json").is_file()
    assert (out / "lora-test" / "adapter_model.safetensors").read_bytes() == before


def test_minutes_budget_stops_training_early(tiny_base, synthetic_corpus, tmp_path):
    from memories.lora.build import LoraBuildConfig, stage_corpus, stage_train

    cfg = LoraBuildConfig(base=str(tiny_base), corpus=str(synthetic_corpus), name="budget", out=str(tmp_path), max_tokens=3000, eval_tokens=600,
                          validation_fraction=0.08, test_fraction=0.08, context=64, stride=32, rank=4, alpha=8, minutes=1e-9, progress=False)  # fmt: skip
    stage_corpus(cfg)
    rec = stage_train(cfg)
    assert rec["steps"] == 1 and rec["stopped_by_budget"] and rec["planned_steps"] > 1


@pytest.mark.parametrize(
    "change, words",
    [
        (("--base", "/nonexistent/base"), "--base '/nonexistent/base' is not a directory"),
        (("--rank", "0"), "--rank must be at least 1"),
        (("--targets", "q_proj,lm_head"), "--targets q_proj,lm_head: each must be one of"),
        (("--corpus", "/nonexistent/corpus.txt"), "/nonexistent/corpus.txt"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tiny_base, synthetic_corpus, tmp_path, capsys, change, words):
    from memories.cli import main

    args = _args(tiny_base, synthetic_corpus, tmp_path)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "lora-test").exists()
