"""Decoder memory slots (server/worker/bank.py): which memories fit, and when a slot is free again."""

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from memories.artifact import ArtifactError
from server.worker.bank import LaneGroup, MemoryBank, Shard
from tests.tiny_models import build_llama
from tests.unit.test_processor import make_bank


def test_a_memory_of_another_width_is_refused_naming_both_shapes(tiny, tmp_path):
    from transformers import AutoTokenizer

    narrow = build_llama(tmp_path / "narrow", AutoTokenizer.from_pretrained(tiny["tokenizer"]), layers=1, seed=5, hidden=64, ship_tokenizer=False)
    bank = make_bank(tiny, slots=1)
    with pytest.raises(ArtifactError) as e:
        bank.load(str(narrow), "narrow@1", lambda s: False, None)
    assert e.value.check == "memory does not fit the server's memory slots"
    assert "memory: hidden 64" in e.value.detail and "slots hold: hidden 128" in e.value.detail
    assert bank.held == [None]  # nothing half-loaded


def test_deeper_than_the_slots_is_refused(tiny):
    bank = make_bank(tiny, slots=1)
    shallow = MemoryBank(bank.shape, bank.embed.dtype, bank.rotary, 1, 1, 1, False, lambda *_: bank.attn[0])
    with pytest.raises(ArtifactError, match="up to 1 layers"):
        shallow.load(str(tiny["beta"]), "beta@1", lambda s: False, None)  # 2 layers
    assert shallow.load(str(tiny["alpha"]), "alpha@1", lambda s: False, None).layers == 1


def test_a_retired_slot_is_reused_once_no_row_runs_on_it(tiny):
    bank = make_bank(tiny, slots=1)
    first = bank.load(str(tiny["alpha"]), "alpha@1", lambda s: False, None)
    with pytest.raises(ArtifactError, match="--decoder-slots 1"):
        bank.load(str(tiny["beta"]), "beta@1", lambda s: False, None)
    first.retired = True
    with pytest.raises(ArtifactError, match="no free"):
        bank.load(str(tiny["beta"]), "beta@1", lambda s: s is first, None)  # a row still decodes on it
    second = bank.load(str(tiny["beta"]), "beta@1", lambda s: False, None)
    assert second.index == first.index == 0 and bank.held == [second]


def narrow_mlp(path: Path, out: Path, channels: int) -> Path:
    """A copy of the memory at ``path`` whose MLP keeps its first ``channels`` channels (a narrower MLP than the base's)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = load_file(path / "model.safetensors")
    for name, t in weights.items():
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            weights[name] = t[:channels].contiguous()
        elif name.endswith("down_proj.weight"):
            weights[name] = t[:, :channels].contiguous()
    save_file(weights, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "intermediate_size": channels}))
    return out


class Ranks:
    """``world`` ranks run in threads, each its own bank; ``reduce`` sums a tensor over them, as vLLM's all-reduce does."""

    def __init__(self, world: int):
        self.barrier, self.parts = threading.Barrier(world), [None] * world

    def reduce(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0])
            self.barrier.wait()  # every rank has read the parts before the next reduce overwrites them
            return total

        return all_reduce


def test_sharded_slots_compute_what_whole_slots_compute(tiny, tmp_path):
    """Two tensor-parallel ranks, each with its heads (the one key/value head replicated) and half of the MLP,
    give the whole bank's hidden states: a 1-layer and a 2-layer memory in one lane, a narrower MLP zero-padded."""
    from tests.unit.test_gpu_proxies import StepAttention

    narrow = narrow_mlp(tiny["beta"], tmp_path / "narrow", 96)
    memories = [(tiny["alpha"], "alpha@1"), (narrow, "narrow@1")]
    ids, positions = torch.tensor([5, 6, 7, 8, 9, 10, 11]), torch.arange(7)
    tokens = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6])]

    def run(shard: Shard, reduce=None) -> torch.Tensor:
        whole = make_bank(tiny, slots=2, lanes=1)
        c = whole.shape

        def step(i: int, heads: int, kv_heads: int) -> StepAttention:  # over this rank's head counts, as the bank gives them
            return StepAttention(SimpleNamespace(head_dim=c.head_dim, heads=heads, kv_heads=kv_heads))

        bank = MemoryBank(c, torch.float32, whole.rotary, 2, 1, c.layers, False, step, shard, reduce)
        slots = [bank.load(str(path), key, lambda s: False, None) for path, key in memories]
        return bank(ids, positions, [[LaneGroup(s, t) for s, t in zip(slots, tokens)]])

    whole = run(Shard())
    ranks = Ranks(2)
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda r: run(Shard(r, 2), ranks.reduce(r)), range(2)))
    assert make_bank(tiny).shape.kv_heads == 1  # so both ranks hold the same key/value head
    for part in parts:
        torch.testing.assert_close(part, whole, atol=1e-5, rtol=1e-5)
    assert whole[0, 3:].abs().sum() > 0  # the narrow memory's tokens were computed
