"""One full build on the synthetic domain corpus, inspected stage by stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memories.stage import stage_info


def test_datastore_rows_are_training_positions(built):
    cfg, _ = built
    train = np.load(cfg.work / "corpus" / "train.npy")
    shard = cfg.work / "datastore" / "shard-000-of-001"
    keys = np.load(shard / "keys.npy", mmap_mode="r")
    values, positions = np.load(shard / "values.npy"), np.load(shard / "positions.npy")
    assert len(train) == cfg.max_tokens + 1  # max_tokens scored positions
    assert keys.shape == (len(train) - 1, 128) and keys.dtype == np.float16
    assert np.array_equal(positions, np.arange(len(train) - 1))
    assert np.array_equal(values, train[1:])
    assert stage_info(shard)["rows"] == len(train) - 1


def test_keys_are_the_last_layers_mlp_input(built, tiny_base):
    """Recompute one window's keys: the last layer's post-attention norm output."""
    import torch
    from transformers import AutoModelForCausalLM

    from memories.windows import iter_windows

    cfg, _ = built
    train = np.load(cfg.work / "corpus" / "train.npy")
    w = list(iter_windows(len(train), cfg.context, cfg.stride))[3]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    seen = []
    h = model.model.layers[-1].mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(train[w.begin : w.end], dtype=torch.long)[None])
    h.remove()
    keys = np.load(cfg.work / "datastore" / "shard-000-of-001" / "keys.npy", mmap_mode="r")
    expect = seen[0][0, w.offset :].numpy()
    assert np.allclose(keys[w.first : w.end].astype(np.float32), expect, atol=2e-2, rtol=1e-2)


def test_targets_are_distributions(built):
    cfg, _ = built
    ids = np.load(cfg.work / "targets" / "ids.npy", mmap_mode="r")
    probs = np.load(cfg.work / "targets" / "probs.npy", mmap_mode="r")
    assert ids.shape == (cfg.max_tokens, cfg.top)
    assert np.allclose(probs.astype(np.float64).sum(1), 1.0, atol=5e-3)
    assert (probs >= 0).all()


def test_training_loss_falls(built):
    cfg, _ = built
    before, *epochs = json.loads((cfg.work / "train" / "train_log.json").read_text())["epochs"]
    assert len(epochs) == cfg.epochs
    assert epochs[-1]["loss"] < 0.85 * epochs[0]["loss"]
    assert epochs[-1]["ce"] < epochs[0]["ce"]


def test_memory_learns_the_knn_distribution_of_held_out_text(built):
    """The training stage measures the fit to the retriever on validation positions, before and after."""
    cfg, _ = built
    history = json.loads((cfg.work / "train" / "train_log.json").read_text())["epochs"]
    assert history[0]["epoch"] == 0 and "loss" not in history[0]
    assert history[-1]["heldout_kl"] < 0.8 * history[0]["heldout_kl"], history
    assert history[-1]["heldout_ppl"] < history[0]["heldout_ppl"]


def test_memory_beats_base_on_held_out_domain_text(built):
    cfg, _ = built
    report = json.loads((cfg.work / "evaluate" / "report.json").read_text())
    test = report["test"]
    assert test["memory"] < 0.5 * test["base"], test
    assert test["knnlm"] < test["base"], test
    assert 0.0 < report["memory_lambda"] <= 1.0
    assert (cfg.work / "evaluate" / "report.md").read_text().startswith("# Memory evaluation")
    assert (cfg.work / "evaluate" / "ppl_vs_lambda.png").stat().st_size > 1000


def test_artifact_is_servable(built, tiny_base):
    from transformers import AutoTokenizer

    from memories.artifact import check_compatible, read_card

    cfg, artifact = built
    assert artifact == cfg.artifact and artifact.is_dir()
    base_tok = AutoTokenizer.from_pretrained(str(tiny_base))
    card = read_card(artifact, "synth")
    check_compatible(card, base_tok)
    meta = json.loads((artifact / "memory.json").read_text())
    assert meta["format"] == 1 and meta["name"] == "synth" and meta["base_model"]
    assert meta["lambda"] == card.weight and meta["temperature"] == card.temperature > 0
    assert meta["corpus"]["documents"] == 320 and meta["corpus"]["datastore_tokens"] == cfg.max_tokens
    assert set(meta["corpus"]["splits"]) == {"train", "validation", "test"}
    assert meta["metrics"]["test_ppl_memory"] < meta["metrics"]["test_ppl_base"]
    assert card.architecture == "LlamaForCausalLM"
    config = json.loads((artifact / "config.json").read_text())
    assert config["num_hidden_layers"] == cfg.layers and config["vocab_size"] == len(base_tok)
    assert not any(p.name.startswith(".") for p in artifact.parent.iterdir() if p.name != "work")


def test_artifact_carries_a_routing_profile_of_its_train_split(built, tiny_base):
    from transformers import AutoTokenizer

    from memories.artifact import tokenizer_sha256
    from memories.routing import Router, read_profile

    cfg, artifact = built
    base_tok = AutoTokenizer.from_pretrained(str(tiny_base))
    profile = read_profile(artifact, vocab_size=len(base_tok))
    train = np.load(cfg.work / "corpus" / "train.npy")
    assert profile.source == "train split" and profile.tokens == len(train) and profile.vocab_size == len(base_tok)
    assert profile.tokenizer_sha256 == tokenizer_sha256(base_tok)
    assert profile.calibration["in_domain_windows"] > 0  # calibrated on the validation split
    test = np.load(cfg.work / "corpus" / "test.npy")
    router = Router({"synth": profile}, len(base_tok))
    assert router.route(test[:256]).memory == "synth"  # held-out text of its own domain routes to it


@pytest.mark.parametrize("init, from_base", [("first", [0, 1]), ("ends", [0, 2])])
def test_memory_starts_from_the_base(tiny_base, init, from_base):
    """The memory's layers are copies of the base layers its init names (the 3-layer base cut to 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memories.training import init_memory

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    memory = init_memory(tiny_base, 2, init)
    assert memory.config.num_hidden_layers == 2
    b, m = base.state_dict(), memory.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(b[key], m[key])
    for new, old in enumerate(from_base):
        for part in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
            assert torch.equal(m[f"model.layers.{new}.{part}"], b[f"model.layers.{old}.{part}"])
    ids = torch.arange(10)[None]
    assert memory(input_ids=ids).logits.shape == base(input_ids=ids).logits.shape


def test_cli_rebuild_skips_every_stage(built, tiny_base, synthetic_corpus, caplog):
    """The same options through the CLI find every stage up to date and only re-package."""
    import logging

    from memories.cli import main

    cfg, artifact = built
    args = ["build", "--base", str(tiny_base), "--corpus", str(synthetic_corpus), "--name", "synth", "--out", cfg.out]
    args += ["--max-tokens", "12000", "--eval-tokens", "2000", "--validation-fraction", "0.08", "--test-fraction", "0.08"]
    args += ["--context", "64", "--stride", "32", "--k", "64", "--top", "16", "--layers", "2", "--epochs", "4", "--lr", "0.003"]
    args += ["--accumulate", "2", "--threads", "1", "--no-progress"]
    with caplog.at_level(logging.INFO, logger="memserve.memory"):
        assert main(args) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "up to date" in r.getMessage()]
    assert len(skipped) == 7, skipped  # corpus, datastore, index, heldout, targets, train, evaluate
    assert (artifact / "memory.json").exists()


def test_thin_build_trains_around_the_base_embeddings_and_leaves_them_out(built, tiny_base, synthetic_corpus, tmp_path):
    """``embeddings="base"``: the same upstream stages, embedding and head frozen, the artifact without them."""
    import shutil

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memories.artifact import check_compatible, read_card
    from memories.runner import MemoryDecoder
    from memories.decoder.pipeline import build
    from tests.pipeline.conftest import tiny_config

    full_cfg, full_artifact = built
    cfg = tiny_config(tiny_base, synthetic_corpus, tmp_path / "thin", embeddings="base")
    for stage in ("corpus", "datastore", "index", "heldout", "targets"):
        shutil.copytree(full_cfg.work / stage, cfg.work / stage)
    artifact = build(cfg)

    assert json.loads((artifact / "memory.json").read_text())["embeddings"] == "base"
    (weights,) = artifact.glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as st:
        assert not [k for k in st.keys() if "embed_tokens" in k or "lm_head" in k]
    base_config = json.loads((tiny_base / "config.json").read_text())
    card = read_card(artifact, "thin")
    check_compatible(card, AutoTokenizer.from_pretrained(str(tiny_base)), base_config)
    assert read_card(full_artifact, "full").num_parameters - card.num_parameters == base_config["vocab_size"] * 128  # tied: one tensor

    base = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    trained = AutoModelForCausalLM.from_pretrained(str(cfg.work / "train")).eval()
    embed = base.model.embed_tokens.weight.detach()
    assert torch.equal(trained.model.embed_tokens.weight, embed)  # frozen
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)  # trained
    # served on the base's tensors, the artifact is the model that was evaluated
    decoder = MemoryDecoder(artifact, base_tensors={"embed_tokens.weight": embed, "lm_head.weight": embed})
    ids = list(range(2, 30))
    with torch.no_grad():
        expected = trained(torch.tensor([ids])).logits[0]
    assert torch.allclose(decoder.head(decoder.read([decoder.open()], [ids])[0]), expected, atol=1e-4)
