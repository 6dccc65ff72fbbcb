"""``memserve memory compare`` on tiny builds: every kind scored on the positions its own build reported, plus another source and other domains.

The decoder memory is the session's tiny build (conftest ``built``); a lora
memory is trained here on the same corpus with the same corpus options, and a
second lora on another synthetic corpus makes a second domain for the
cross-domain matrix. What compare prints must be the builds' own evaluation
numbers where the two measure the same thing, or the table compares nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.pipeline.conftest import synthetic_documents


def _lora(base: Path, corpus: Path, out: Path, name: str, domain: str) -> Path:
    from memories.cli import main

    args = [
        "build", "--kind", "lora", "--base", str(base), "--corpus", str(corpus), "--name", name, "--domain", domain, "--out", str(out),
        "--max-tokens", "3000", "--eval-tokens", "2000", "--validation-fraction", "0.08", "--test-fraction", "0.08",
        "--context", "64", "--stride", "32", "--rank", "8", "--alpha", "16", "--epochs", "1", "--lr", "1e-2", "--batch", "4",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    return out / name


def _compare_args(base: Path, memories: list[Path], out: Path, work_roots: list[Path], *extra: str) -> list[str]:
    args = ["compare", "--base", str(base), "--out", str(out), "--context", "64", "--stride", "32", "--threads", "1", "--no-progress"]
    args += [a for m in memories for a in ("--memory", str(m))] + [a for w in work_roots for a in ("--work-root", str(w))]
    return args + ["--validation-fraction", "0.08", "--test-fraction", "0.08", *extra]


@pytest.fixture(scope="module")
def compared(built, tiny_base, tmp_path_factory, synthetic_corpus):
    from memories.cli import main

    torch.set_num_threads(1)
    cfg, decoder = built
    root = tmp_path_factory.mktemp("compare")
    other = root / "other-corpus"  # the same kind of text, other documents: the synthetic domain "from another source"
    other.mkdir()
    for i, text in enumerate(synthetic_documents(120, seed=7)):
        (other / f"o{i:03d}.txt").write_text(text)
    lora = _lora(tiny_base, synthetic_corpus, root / "memories", "synth-lora", cfg.domain or cfg.name)
    second = _lora(tiny_base, other, root / "memories", "second", "second")
    works = [Path(cfg.work).parent, root / "memories" / "work"]
    bench = root / "bench.json"  # what `memserve bench --json` writes, reduced to what compare reads
    bench.write_text(json.dumps({"runs": [{"streams": n, "scenarios": {"base": {"ratio_to_base": 1.0}, "memory": {"ratio_to_base": r}}} for n, r in ((1, 0.9), (8, 0.7))]}))
    domain = cfg.domain or cfg.name
    args = _compare_args(tiny_base, [Path(decoder), lora, second], root / "out", works, "--eval-tokens", "2000", "--other-source", f"{domain}={other}", "--cross", cfg.name, "--bench", f"synth-lora={bench}")
    assert main(args) == 0
    return cfg, root, json.loads((root / "out" / "report.json").read_text()), (tiny_base, [Path(decoder), lora, second], works)


def test_compare_reproduces_each_builds_own_test_numbers(compared):
    cfg, root, report, _ = compared
    domain = cfg.domain or cfg.name
    own = f"{domain}/own/test"
    decoder_eval = json.loads((Path(cfg.work) / "evaluate" / "report.json").read_text())["test"]
    lora_eval = json.loads((root / "memories" / "work" / "synth-lora" / "evaluate" / "report.json").read_text())["test"]
    assert report["base"][own] == pytest.approx(decoder_eval["base"], rel=1e-6)
    assert report["memories"][cfg.name]["ppl"][own] == pytest.approx(decoder_eval["memory"], rel=1e-6)
    assert report["knnlm"][domain][own] == pytest.approx(decoder_eval["knnlm"], rel=1e-5)
    assert report["memories"]["synth-lora"]["ppl"][own] == pytest.approx(lora_eval["lora"], rel=1e-6)
    assert report["memories"][cfg.name]["variant"].startswith("decoder") and report["memories"]["synth-lora"]["variant"] == "lora, trained"
    assert report["memories"][cfg.name]["cpu_minutes"] > 0 and report["memories"]["synth-lora"]["cpu_minutes"] > 0
    assert report["memories"]["synth-lora"]["served"] == {"1": 0.9, "8": 0.7} and "0.90 / 0.70" in (root / "out" / "report.md").read_text()
    assert 0 < report["memories"]["synth-lora"]["flops"] < 0.5 < report["memories"][cfg.name]["flops"]  # an adapter vs a 2-of-3-layer memory


def test_compare_scores_another_source_and_other_domains(compared):
    cfg, root, report, _ = compared
    domain = cfg.domain or cfg.name
    decoder = report["memories"][cfg.name]
    assert {f"{domain}/other/test", "second/own/test"} <= set(decoder["ppl"])  # --cross: the other domain's test set too
    assert set(report["memories"]["second"]["ppl"]) == {"second/own/test"}  # not crossed: its own domain only
    rules = report["lambda_rules"][cfg.name]
    assert rules["own"]["own"] == pytest.approx(decoder["ppl"][f"{domain}/own/test"]) and rules["own"]["lambda"] == decoder["lambda"]
    assert set(rules) == {"own", "mixed", "entropy"} and all(v["other"] > 0 for v in rules.values())
    md = (root / "out" / "report.md").read_text()
    assert f"`{cfg.name}`" in md and "Cross-domain matrix" in md and "λ rules" in md
    assert report["targets"][domain]["other_source_gain_at_own_lambda"] == pytest.approx(1 - decoder["ppl"][f"{domain}/other/test"] / report["base"][f"{domain}/other/test"])
    small = report["targets"][domain]["at_most_a_third_of_base_flops_ppl_ratio_by_kind"]  # the lora is; the 2-of-3-layer decoder is not
    lora = report["memories"]["synth-lora"]
    assert lora["flops"] <= 1 / 3 and small == {"lora": pytest.approx(lora["ppl"][f"{domain}/own/test"] / report["base"][f"{domain}/own/test"])}


def test_compare_refuses_options_that_change_a_builds_test_split(compared, capsys):
    from memories.cli import main

    _, root, _, (base, memories, works) = compared
    assert main(_compare_args(base, memories[:1], root / "bad", works, "--eval-tokens", "1500")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-tokens" in err[0], err


def test_entropy_rule_at_zero_slope_is_the_fixed_lambda():
    import numpy as np

    from memories.compare import Scores, entropy_weights, fused_ppl

    rng = np.random.default_rng(0)
    base = Scores(np.log(rng.uniform(0.01, 1, 50)), rng.uniform(0, 5, 50))
    mem = Scores(np.log(rng.uniform(0.01, 1, 50)), rng.uniform(0, 5, 50))
    assert np.allclose(entropy_weights(base, mem, 0.3, 0.0), 0.3)
    assert fused_ppl(base, mem, entropy_weights(base, mem, 0.3, 0.0)) == pytest.approx(fused_ppl(base, mem, 0.3), rel=1e-12)
    w = entropy_weights(base, mem, 0.3, 1.0)  # more memory exactly where the base is less sure than the memory
    assert np.all((w > 0.3) == (base.entropy > mem.entropy))


def test_a_rerun_scores_nothing_again(compared, monkeypatch):
    """Every (model, text) score is kept under OUT/scores: a re-run (say with one more memory) only scores what is new."""
    from memories import compare
    from memories.cli import main

    cfg, root, report, (base, memories, works) = compared
    monkeypatch.setattr(compare, "score", lambda *a, **k: pytest.fail("scored again"))
    args = _compare_args(base, memories, root / "out", works, "--eval-tokens", "2000", "--other-source", f"{cfg.domain or cfg.name}={root / 'other-corpus'}", "--cross", cfg.name)
    assert main(args) == 0
    again = json.loads((root / "out" / "report.json").read_text())
    assert again["memories"][cfg.name]["ppl"] == report["memories"][cfg.name]["ppl"] and again["knnlm"] == report["knnlm"]
