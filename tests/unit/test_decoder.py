"""The serving-side memory decoder against transformers on the same weights."""

import json

import pytest
import torch

from memories.artifact import ArtifactError
from memories.decoder import MemoryDecoder


@pytest.fixture(scope="module")
def model_pair(tiny):
    from transformers import AutoModelForCausalLM

    return MemoryDecoder(tiny["beta"]), AutoModelForCausalLM.from_pretrained(tiny["beta"]).eval()


def hf_last(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_prompt_then_batched_steps_match_full_recompute(model_pair):
    dec, hf = model_pair
    seqs = [[5, 9, 11, 40], [7], [3, 3, 3, 3, 3, 3, 3, 3, 3]]
    slots = [dec.open() for _ in seqs]
    out = dec.advance(slots, seqs)
    for i, s in enumerate(seqs):
        assert torch.allclose(out[i], hf_last(hf, s), atol=1e-4)
    for step in range(300):  # past the initial KV capacity, so the pool grows
        new = [[(step * 13 + i) % 200] for i in range(3)]
        out = dec.advance(slots, new)
        for s, n in zip(seqs, new):
            s += n
    for i, s in enumerate(seqs):
        assert torch.allclose(out[i], hf_last(hf, s), atol=1e-3)
    for s in slots:
        dec.close(s)


def test_slots_are_reused_and_independent(model_pair):
    dec, hf = model_pair
    a, b = dec.open(), dec.open()
    dec.advance([a, b], [[1, 2, 3], [4, 5]])
    dec.close(a)
    c = dec.open()
    assert c == a and dec.length(c) == 0
    out = dec.advance([c, b], [[9, 9], [6]])
    assert torch.allclose(out[0], hf_last(hf, [9, 9]), atol=1e-4)
    assert torch.allclose(out[1], hf_last(hf, [4, 5, 6]), atol=1e-4)
    many = [dec.open() for _ in range(9)]  # more than the initial slot count
    assert len(set(many)) == 9
    for s in many + [b, c]:
        dec.close(s)


def test_shape_mismatch_is_refused(tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny["alpha"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="weights do not match config.json"):
        MemoryDecoder(bad, name="bad")
