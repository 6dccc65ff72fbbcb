"""Killed builds resume: finished stages are reused, half-written ones are not trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.pipeline.conftest import tiny_config
from memories.decoder import pipeline
from memories.stage import stage_info


def _small(tiny_base, corpus, out, **kw):
    return tiny_config(tiny_base, corpus, out, max_tokens=3000, eval_tokens=600, epochs=2, **kw)


def test_run_killed_after_index_resumes_without_recomputing_datastore(tmp_path, tiny_base, synthetic_corpus, monkeypatch):
    import memories.decoder.datastore as ds

    out = tmp_path / "out"
    assert pipeline.build(_small(tiny_base, synthetic_corpus, out, stop_after="index")) is None
    shard = out / "work" / "synth" / "datastore" / "shard-000-of-001"
    before = stage_info(shard)
    mtime = (shard / "keys.npy").stat().st_mtime_ns
    assert (out / "work" / "synth" / "index" / "index.faiss").exists()
    assert not (out / "work" / "synth" / "targets").exists()
    # a half-written later stage, as a kill would leave it
    (out / "work" / "synth" / ".targets.partial").mkdir()
    (out / "work" / "synth" / ".targets.partial" / "ids.npy").write_bytes(b"garbage")

    def forbidden(*a, **k):
        raise AssertionError("datastore recomputed")

    monkeypatch.setattr(ds, "build_datastore", forbidden)
    artifact = pipeline.build(_small(tiny_base, synthetic_corpus, out))
    assert artifact is not None and (artifact / "memory.json").exists()
    assert stage_info(shard) == before and (shard / "keys.npy").stat().st_mtime_ns == mtime
    assert not (out / "work" / "synth" / ".targets.partial").exists()
    ids = np.load(out / "work" / "synth" / "targets" / "ids.npy")
    assert len(ids) == 3000


def test_changed_option_redoes_only_downstream_stages(tmp_path, tiny_base, synthetic_corpus):
    out = tmp_path / "out"
    pipeline.build(_small(tiny_base, synthetic_corpus, out, stop_after="targets"))
    work = out / "work" / "synth"
    fps = {s: stage_info(work / s)["fingerprint"] for s in ("corpus", "index", "heldout", "targets")}
    pipeline.build(_small(tiny_base, synthetic_corpus, out, stop_after="targets", top=8))
    assert {s: stage_info(work / s)["fingerprint"] for s in ("corpus", "index", "heldout")} == {k: fps[k] for k in ("corpus", "index", "heldout")}
    assert stage_info(work / "targets")["fingerprint"] != fps["targets"]
    assert np.load(work / "targets" / "ids.npy").shape[1] == 8


def test_training_resumes_from_epoch_checkpoint(tmp_path, tiny_base, synthetic_corpus, monkeypatch):
    import memories.decoder.train as tr

    out = tmp_path / "out"
    cfg = _small(tiny_base, synthetic_corpus, out, stop_after="targets")
    pipeline.build(cfg)
    real_save = tr._save_checkpoint

    def save_then_die(ckpt_dir, epoch, state):
        real_save(ckpt_dir, epoch, state)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(tr, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(_small(tiny_base, synthetic_corpus, out, stop_after="train"))
    work = out / "work" / "synth"
    assert not (work / "train").exists()
    assert len(list((work / "train-checkpoints").rglob("epoch-0.pt"))) == 1
    monkeypatch.setattr(tr, "_save_checkpoint", real_save)
    seen = []
    monkeypatch.setattr(tr, "_latest_checkpoint", lambda d, f=tr._latest_checkpoint: seen.append(f(d)) or seen[-1])
    pipeline.build(_small(tiny_base, synthetic_corpus, out, stop_after="train"))
    assert seen[0] is not None and seen[0].name == "epoch-0.pt"
    history = json.loads((work / "train" / "train_log.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # the held-out fit before training, then each epoch
    assert not (work / "train-checkpoints").exists()


def test_shards_built_separately_merge_in_order(tmp_path, tiny_base, synthetic_corpus):
    out = tmp_path / "out"
    cfg = _small(tiny_base, synthetic_corpus, out, shards=3)
    corpus = pipeline.stage_corpus(cfg)
    with pytest.raises(pipeline.StageError, match="datastore shards missing"):
        pipeline.stage_datastore(cfg, corpus, shards=[0, 2]) and pipeline.stage_index(cfg)
    pipeline.stage_datastore(cfg, corpus, shards=[1])
    info = pipeline.stage_index(cfg)
    values = np.load(out / "work" / "synth" / "index" / "values.npy")
    train = np.load(out / "work" / "synth" / "corpus" / "train.npy")
    assert info["rows"] == len(train) - 1 and np.array_equal(values, train[1:])
