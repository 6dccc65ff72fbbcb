"""``memserve memory compose`` on tiny models: a calm memory trained, evaluated, packaged and accepted by the server's checks.

The base is a random 3-layer Llama; the augmenting model a 2-layer one trained
here for a few steps on the same kind of text, so it knows the corpus and the
base does not: a composition that learns must beat the base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import build_llama, build_tokenizer, corpus

CONTEXT, STRIDE = 64, 32


def _train_briefly(path: Path, texts: list[str], tok, steps: int = 40) -> None:
    """Fit a tiny model to the corpus's word statistics (a few seconds): the augmenting model 'knows' the domain."""
    from transformers import AutoModelForCausalLM

    from memories.calm.train import batch_loss, windows_from_stream

    stream = np.concatenate([np.asarray(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts])
    windows = windows_from_stream(stream, CONTEXT, CONTEXT)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        loss, _ = batch_loss(model, windows, rng.choice(len(windows), 8).tolist(), "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("calm-models")
    tok = build_tokenizer(root / "tokenizer")
    texts = corpus(500, seed=7)
    (root / "corpus.txt").write_text("\n\n".join(texts))
    base = build_llama(root / "base", tok, layers=3, seed=1)
    augment = build_llama(root / "augment", tok, layers=2, seed=2)
    _train_briefly(augment, texts, tok)
    decoder = build_llama(root / "decoder", tok, layers=1, seed=3, memory_json={"name": "decoder", "lambda": 0.3, "temperature": 1.5})
    other_tok = build_tokenizer(root / "other-tokenizer", vocab_size=300)
    stranger = build_llama(root / "stranger", other_tok, layers=2, seed=4, vocab_size=len(tok))
    return {"base": base, "augment": augment, "decoder": decoder, "stranger": stranger, "corpus": root / "corpus.txt", "tokenizer": tok, "root": root}


def _args(m, out: Path, *extra: str) -> list[str]:
    return [
        "compose", "--base", str(m["base"]), "--augment", str(m["augment"]), "--corpus", str(m["corpus"]), "--name", "calm-test",
        "--out", str(out), "--connections", "2", "--max-tokens", "6000", "--eval-tokens", "1500", "--validation-fraction", "0.1",
        "--test-fraction", "0.1", "--context", str(CONTEXT), "--stride", str(STRIDE), "--epochs", "2", "--lr", "3e-3", "--batch", "4",
        "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def composed_memory(models, tmp_path_factory):
    from memories.cli import main

    out = tmp_path_factory.mktemp("calm-out")
    assert main(_args(models, out, "--decoder-memory", str(models["decoder"]))) == 0
    return out / "calm-test", out


def test_cli_writes_a_calm_memory_the_server_accepts(composed_memory, models):
    from memories.calm.composition import AUGMENT_DIR, COMPOSITION_FILE, Composition, CompositionSpec
    from memories.kinds import check_any_compatible, read_any_card

    artifact, out = composed_memory
    card = read_any_card(artifact, "calm-test")
    check_any_compatible(card, models["tokenizer"], json.loads((models["base"] / "config.json").read_text()), None)
    assert card.kind == "calm" and card.connections == ((0, 0), (1, 1))
    meta = json.loads((artifact / "memory.json").read_text())
    assert meta["kind"] == "calm" and meta["name"] == "calm-test" and meta["base_width"] == 128 and meta["heads"] == 2
    assert (artifact / AUGMENT_DIR / "tokenizer.json").exists() and not (artifact / AUGMENT_DIR / "memory.json").exists()
    comp = Composition.load(artifact / COMPOSITION_FILE, CompositionSpec.from_card("calm-test", meta), "calm-test")
    assert all(c.gate.item() != 0.0 for c in comp.connections)  # trained: the gates opened
    m = meta["metrics"]
    for key in ("test_ppl_base", "test_ppl_augment", "test_ppl_composition", "test_ppl_decoder_memory", "train_seconds"):
        assert math.isfinite(m[key]), key
    assert meta["corpus"]["splits"]["test"]["tokens"] == 1501
    assert not list(artifact.parent.glob(".*partial"))
    from memories.routing import read_profile

    assert read_profile(artifact, len(models["tokenizer"])).source == "train split"  # routable with domain "auto"
    report = out / "work" / "calm-test" / "evaluate"
    assert (report / "report.md").read_text().count("| base") >= 2 and (report / "compose.png").stat().st_size > 1000
    assert json.loads((report / "report.json").read_text())["test"]["composition"] == m["test_ppl_composition"]


def test_training_makes_the_composition_beat_the_base(composed_memory):
    artifact, out = composed_memory
    m = json.loads((artifact / "memory.json").read_text())["metrics"]
    assert m["validation_loss_composition"] < m["validation_loss_base"] - 0.5
    assert m["test_ppl_composition"] < 0.5 * m["test_ppl_base"]
    log = json.loads((out / "work" / "calm-test" / "train" / "train_log.json").read_text())
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == m["steps"] and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


def test_untrained_composition_is_exactly_the_base(models):
    from transformers import AutoModelForCausalLM

    from memories.calm.composition import Composition
    from memories.calm.hf import composed
    from memories.calm.pipeline import ComposeConfig, composition_spec

    cfg = ComposeConfig(base=str(models["base"]), augment=str(models["augment"]), corpus="", name="x", out="", connections=2)
    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    augment = AutoModelForCausalLM.from_pretrained(models["augment"]).eval()
    ids = torch.randint(3, len(models["tokenizer"]), (2, 40))
    with torch.no_grad():
        alone = base(input_ids=ids).logits
        with composed(base, augment, Composition(composition_spec(cfg))):
            together = base(input_ids=ids).logits
    assert torch.equal(alone, together)


def test_decoder_memory_number_is_the_fused_perplexity(composed_memory, models):
    """Recomputed independently: full-vocabulary ``fuse`` at the memory's λ and T over the same windows."""
    from transformers import AutoModelForCausalLM

    from memories.fuse import fuse
    from memories.perplexity import perplexity
    from memories.windows import iter_windows

    artifact, out = composed_memory
    test = np.load(out / "work" / "calm-test" / "corpus" / "test.npy")
    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    memory = AutoModelForCausalLM.from_pretrained(models["decoder"]).eval()
    lps = []
    with torch.no_grad():
        for w in iter_windows(len(test), CONTEXT, STRIDE):
            ids = torch.as_tensor(test[w.begin : w.end], dtype=torch.long)[None]
            fused = fuse(base(input_ids=ids).logits[0, w.offset :], memory(input_ids=ids).logits[0, w.offset :], 0.3, 1.5)
            lps.append(fused.gather(-1, torch.as_tensor(test[w.first + 1 : w.end + 1], dtype=torch.long)[:, None])[:, 0])
    expected = perplexity(torch.cat(lps))
    got = json.loads((artifact / "memory.json").read_text())["metrics"]["test_ppl_decoder_memory"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_test_split_is_the_decoder_builds(composed_memory, models, tmp_path):
    from memories.decoder.pipeline import BuildConfig, stage_corpus

    _, out = composed_memory
    cfg = BuildConfig(base=str(models["base"]), corpus=str(models["corpus"]), name="d", out=str(tmp_path), eval_tokens=1500, max_tokens=6000, validation_fraction=0.1, test_fraction=0.1)
    stage_corpus(cfg)
    for split in ("train", "validation", "test"):
        assert np.array_equal(np.load(tmp_path / "work" / "d" / "corpus" / f"{split}.npy"), np.load(out / "work" / "calm-test" / "corpus" / f"{split}.npy"))


def test_rerun_skips_finished_stages(composed_memory, models, monkeypatch):
    import memories.calm.train as train
    from memories.cli import main

    _, out = composed_memory
    monkeypatch.setattr(train, "train_composition", lambda *a, **k: pytest.fail("training re-ran"))
    monkeypatch.setattr("memories.calm.evaluate.evaluate_systems", lambda *a, **k: pytest.fail("evaluation re-ran"))
    assert main(_args(models, out, "--decoder-memory", str(models["decoder"]))) == 0
    # a changed training option redoes training (and what follows), not the corpus
    corpus_stage = json.loads((out / "work" / "calm-test" / "corpus" / "stage.json").read_text())
    monkeypatch.undo()
    assert main(_args(models, out, "--stop-after", "train", "--epochs", "1", "--max-tokens", "6000")) == 0
    assert json.loads((out / "work" / "calm-test" / "corpus" / "stage.json").read_text()) == corpus_stage
    assert json.loads((out / "work" / "calm-test" / "train" / "stage.json").read_text())["steps"] < json.loads((out / "calm-test" / "memory.json").read_text())["metrics"]["steps"]


def test_killed_training_resumes_from_its_checkpoint(models, tmp_path, monkeypatch):
    import memories.calm.train as train
    from memories.calm.pipeline import ComposeConfig, compose

    cfg = ComposeConfig(
        base=str(models["base"]), augment=str(models["augment"]), corpus=str(models["corpus"]), name="r", out=str(tmp_path), connections=1,
        max_tokens=2000, eval_tokens=300, validation_fraction=0.1, test_fraction=0.1, context=CONTEXT, stride=STRIDE, epochs=2, batch=4,
        checkpoint_every=5, threads=1, progress=False, stop_after="train",
    )  # fmt: skip
    real = train.save_checkpoint

    def save_then_die(d, step, state):
        real(d, step, state)
        if step == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        compose(cfg)
    assert not (tmp_path / "work" / "r" / "train").exists()
    assert [p.name for p in (tmp_path / "work" / "r" / "train-checkpoints").rglob("*.pt")] == ["step-10.pt"]
    monkeypatch.setattr(train, "save_checkpoint", real)
    resumed = []
    monkeypatch.setattr(train, "latest_checkpoint", lambda d, f=train.latest_checkpoint: resumed.append(f(d)) or resumed[-1])
    compose(cfg)
    assert resumed[0].name == "step-10.pt"
    steps = json.loads((tmp_path / "work" / "r" / "train" / "train_log.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and len(steps) > 10
    assert not (tmp_path / "work" / "r" / "train-checkpoints").exists()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"--augment": "stranger"}, "tokenizer differs"),
        ({"--connections": "3"}, "--connections 3: must be in 1..2"),
        ({"--augment": "missing"}, "not a directory"),
        ({"--heads": "3"}, "--heads 3"),
        ({"--decoder-memory": "stranger"}, "--decoder-memory"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(models, tmp_path, capsys, change, words):
    from memories.cli import main

    args = _args(models, tmp_path)
    for flag, value in change.items():
        value = str(models["root"] / value) if flag in ("--augment", "--decoder-memory") else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "calm-test").exists()


def test_prompt_completion_corpus_scores_completions_only(models, tmp_path):
    from memories.calm.pipeline import ComposeConfig, load_split, stage_corpus
    from memories.calm.train import windows_from_stream

    path = tmp_path / "qa.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            f.write(json.dumps({"prompt": f"the {corpus(1, seed=i)[0]} price is", "completion": " bank rate"}) + "\n")
    cfg = ComposeConfig(base=str(models["base"]), augment=str(models["augment"]), corpus=str(path), name="qa", out=str(tmp_path), eval_tokens=400, validation_fraction=0.2, test_fraction=0.2)
    rec = stage_corpus(cfg)
    assert rec["summary"]["scored"] == "completion"
    stream, mask = load_split(cfg, "test")
    answer = models["tokenizer"](" bank rate", add_special_tokens=False)["input_ids"]
    assert mask is not None and set(stream[mask.astype(bool)].tolist()) == set(answer)
    w = windows_from_stream(stream, CONTEXT, STRIDE, mask)
    assert w.counted == int(mask[1:].sum()) and set(w.labels[w.weights.bool()].tolist()) == set(answer)


def test_in_memory_sequences_train_and_padding_changes_nothing(models):
    """The Python API takes token lists directly; right-padding a sequence leaves its positions' loss alone."""
    from transformers import AutoModelForCausalLM

    from memories.calm.composition import Composition
    from memories.calm.hf import composed
    from memories.calm.pipeline import ComposeConfig, composition_spec
    from memories.calm.train import batch_loss, composed_loss, train_composition, windows_from_sequences

    tok = models["tokenizer"]
    seqs = [tok(t)["input_ids"] for t in corpus(24, seed=11)]
    cfg = ComposeConfig(base=str(models["base"]), augment=str(models["augment"]), corpus="", name="x", out="", connections=1)
    base = AutoModelForCausalLM.from_pretrained(models["base"])
    augment = AutoModelForCausalLM.from_pretrained(models["augment"])
    comp = Composition(composition_spec(cfg))
    windows = windows_from_sequences(seqs)
    before = composed_loss(base, augment, comp, windows)
    rec = train_composition(base, augment, comp, windows, epochs=3, lr=3e-3, batch=4, progress=False)
    assert not any(p.requires_grad for p in base.parameters()) and not any(p.requires_grad for p in augment.parameters())
    assert composed_loss(base, augment, comp, windows) < before - 0.5 and rec["steps"] == 18
    alone, padded = windows_from_sequences(seqs[:1]), windows_from_sequences([seqs[0], seqs[0] * 3])
    assert padded.ids.shape[1] > alone.ids.shape[1] and padded.weights[0].sum() == len(seqs[0]) - 1
    with torch.no_grad(), composed(base, augment, comp):
        assert batch_loss(base, padded, [0], "cpu")[0].item() == pytest.approx(batch_loss(base, alone, [0], "cpu")[0].item(), rel=1e-5)


def test_prompt_completion_compose_counts_only_answers_end_to_end(models, tmp_path):
    from memories.calm.pipeline import ComposeConfig, compose, load_split

    path = tmp_path / "qa.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            words = corpus(1, seed=100 + i)[0].split()
            f.write(json.dumps({"prompt": " ".join(words[:-2]), "completion": " " + " ".join(words[-2:])}) + "\n")
    cfg = ComposeConfig(
        base=str(models["base"]), augment=str(models["augment"]), corpus=str(path), name="qa", out=str(tmp_path), connections=1,
        eval_tokens=400, max_tokens=1500, validation_fraction=0.15, test_fraction=0.15, context=CONTEXT, stride=STRIDE, threads=1, progress=False,
    )  # fmt: skip
    artifact = compose(cfg)
    meta = json.loads((artifact / "memory.json").read_text())
    _, mask = load_split(cfg, "test")
    assert meta["corpus"]["scored"] == "completion" and meta["metrics"]["completion_only"] is True
    assert meta["metrics"]["test_positions"] == int(mask[1:].sum()) < meta["corpus"]["splits"]["test"]["tokens"] // 2


def test_packaged_memory_is_the_evaluated_composition(composed_memory, models):
    """Loaded back with the serving oracle's loader, the artifact scores the test split as reported."""
    from transformers import AutoModelForCausalLM

    from memories.calm.hf import composed, load_calm
    from memories.perplexity import model_logprobs
    from memories.perplexity import perplexity

    artifact, out = composed_memory
    augment, composition = load_calm(artifact)
    base = AutoModelForCausalLM.from_pretrained(models["base"]).eval()
    test = np.load(out / "work" / "calm-test" / "corpus" / "test.npy")
    with composed(base, augment, composition):
        ppl = perplexity(model_logprobs(base, test, CONTEXT, STRIDE, "test", progress=False)[1.0])
    assert ppl == pytest.approx(json.loads((artifact / "memory.json").read_text())["metrics"]["test_ppl_composition"], rel=1e-6)
