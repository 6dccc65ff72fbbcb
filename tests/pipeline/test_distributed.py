"""A build under torchrun with 2 CPU processes (gloo) gives the single-process build's memory.

The datastore is split between the processes by shards and training is
DistributedDataParallel; every optimiser step sees the same windows with the
same weights as in one process, and the gradient average over 2 processes of
2×-scaled window gradients is the single process's sum (exact in floating
point). Tolerance: datastore keys and kNN targets identical; per-epoch losses,
held-out fit and test perplexities within 1e-6 relative (measured: identical).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memories.stage import stage_info


def test_two_process_build_matches_one_process(built, tiny_base, synthetic_corpus, tmp_path):
    cfg, _ = built
    out = tmp_path / "out"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "memories", "build"]
    args += ["--base", str(tiny_base), "--corpus", str(synthetic_corpus), "--name", "synth", "--out", str(out)]
    args += ["--max-tokens", "12000", "--eval-tokens", "2000", "--validation-fraction", "0.08", "--test-fraction", "0.08"]
    args += ["--context", "64", "--stride", "32", "--k", "64", "--top", "16", "--layers", "2", "--epochs", "4", "--lr", "0.003"]
    args += ["--accumulate", "2", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one, two = cfg.work, out / "work" / "synth"
    assert [p.name for p in sorted((two / "datastore").iterdir())] == ["shard-000-of-002", "shard-001-of-002"]
    keys2 = np.concatenate([np.load(two / "datastore" / s / "keys.npy") for s in ("shard-000-of-002", "shard-001-of-002")])
    assert np.array_equal(np.load(one / "datastore" / "shard-000-of-001" / "keys.npy"), keys2)
    for f in ("ids.npy", "probs.npy"):
        assert np.array_equal(np.load(one / "targets" / f), np.load(two / "targets" / f)), f
    assert stage_info(two / "train")["processes"] == 2

    h1 = json.loads((one / "train" / "train_log.json").read_text())["epochs"]
    h2 = json.loads((two / "train" / "train_log.json").read_text())["epochs"]
    assert len(h1) == len(h2) == cfg.epochs + 1  # the held-out fit before training, then each epoch
    for a, b in zip(h1, h2):
        for key in ("loss", "kl", "ce", "heldout_kl", "heldout_ppl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), (key, a, b)
    r1 = json.loads((one / "evaluate" / "report.json").read_text())["test"]
    r2 = json.loads((two / "evaluate" / "report.json").read_text())["test"]
    for key in ("base", "knnlm", "memory", "memory_alone"):
        assert r2[key] == pytest.approx(r1[key], rel=1e-6), key
    assert (out / "synth" / "memory.json").exists()
