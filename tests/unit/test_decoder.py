"""The serving-side memory decoder against transformers on the same weights."""

import json

import pytest
import torch

from memories.artifact import ArtifactError
from memories.runner import MemoryDecoder


@pytest.fixture(scope="module")
def model_pair(tiny):
    from transformers import AutoModelForCausalLM

    return MemoryDecoder(tiny["beta"]), AutoModelForCausalLM.from_pretrained(tiny["beta"]).eval()


def hf_last(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def advance(dec, slots, tokens):
    """Each row's final hidden state after reading its new tokens (what the model's forward takes from ``read``)."""
    return torch.stack([hidden[-1] for hidden in dec.read(slots, tokens)])


def test_prompt_then_batched_steps_match_full_recompute(model_pair):
    dec, hf = model_pair
    seqs = [[5, 9, 11, 40], [7], [3, 3, 3, 3, 3, 3, 3, 3, 3]]
    slots = [dec.open() for _ in seqs]
    out = dec.head(advance(dec, slots, seqs))
    for i, s in enumerate(seqs):
        assert torch.allclose(out[i], hf_last(hf, s), atol=1e-4)
    for step in range(300):  # past the initial KV capacity, so the pool grows
        new = [[(step * 13 + i) % 200] for i in range(3)]
        out = dec.head(advance(dec, slots, new))
        for s, n in zip(seqs, new):
            s += n
    for i, s in enumerate(seqs):
        assert torch.allclose(out[i], hf_last(hf, s), atol=1e-3)
    for s in slots:
        dec.close(s)


def test_slots_are_reused_and_independent(model_pair):
    dec, hf = model_pair
    a, b = dec.open(), dec.open()
    advance(dec, [a, b], [[1, 2, 3], [4, 5]])
    dec.close(a)
    c = dec.open()
    assert c == a and dec.length(c) == 0
    out = dec.head(advance(dec, [c, b], [[9, 9], [6]]))
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


@pytest.mark.parametrize("value,dtype", [(float("nan"), torch.float32), (float("inf"), torch.float32), (1e5, torch.float16)])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny, tmp_path, value, dtype):
    from tests.tiny_models import poisoned_copy

    bad = poisoned_copy(tiny["alpha"], tmp_path / "bad", value=value)
    with pytest.raises(ArtifactError, match=r"not finite.*layers\.0\.mlp\.up_proj\.weight"):
        MemoryDecoder(bad, name="bad", dtype=dtype)  # 1e5 is finite in fp32 but not in fp16


def test_pool_shrinks_back_once_nothing_runs(tiny):
    dec = MemoryDecoder(tiny["alpha"])
    small = dec.nbytes
    slots = [dec.open() for _ in range(9)]
    advance(dec, slots[:1], [list(range(1, 300))])  # past the initial capacity
    assert dec.nbytes > small
    for s in slots[:-1]:
        dec.close(s)
    assert dec.nbytes > small  # one sequence still runs
    dec.close(slots[-1])
    assert dec.nbytes == small


def test_budget_is_never_exceeded(tiny):
    per_slot = 2 * 1 * 1 * 64 * 64 * 4  # k and v × 1 layer × 1 kv head × 64 tokens × head size 64 × fp32
    dec = MemoryDecoder(tiny["alpha"], kv_budget_bytes=2 * per_slot, max_len=64)
    a, b = dec.open(), dec.open()
    assert dec.open(protect={a, b}) is None  # every slot is in this step: no growth
    assert dec.open(protect={a}) == b and dec.evictions == 1  # b's row recomputes when it next runs
    assert len(dec._lengths) == 2


def test_budget_counts_bytes_in_the_engine_dtype(tiny):
    per_slot_bf16 = 2 * 1 * 1 * 64 * 64 * 2
    dec = MemoryDecoder(tiny["alpha"], dtype=torch.bfloat16, kv_budget_bytes=4 * per_slot_bf16, max_len=64)
    assert dec._max_slots == 4
    weights = sum(t.numel() for t in {id(t): t for t in dec.w.values()}.values())
    assert dec.nbytes == 2 * weights + 4 * per_slot_bf16


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    from tests.tiny_models import base_embedding_pair

    return base_embedding_pair(tiny["beta"], tiny["base"], tmp_path_factory.mktemp("pair"))


def test_thin_memory_runs_on_the_base_tensors_it_is_given(tiny, pair):
    from tests.tiny_models import base_tensors_of

    full_dir, thin_dir = pair
    shared = base_tensors_of(tiny["base"])
    full, thin = MemoryDecoder(full_dir), MemoryDecoder(thin_dir, base_tensors=shared)
    assert thin.head_weight is shared["lm_head.weight"] and thin.w["embed_tokens.weight"] is shared["embed_tokens.weight"]  # no copies
    own = sum(t.numel() for t in shared.values())
    assert thin.num_parameters == full.num_parameters - own
    assert thin.nbytes == full.nbytes - 4 * own
    seqs = [[5, 9, 11, 40], [7], [3, 3, 3]]
    a, b = [full.open() for _ in seqs], [thin.open() for _ in seqs]
    assert torch.equal(full.head(advance(full, a, seqs)), thin.head(advance(thin, b, seqs)))
    new = [[1], [2], [4]]
    assert torch.equal(full.head(advance(full, a, new)), thin.head(advance(thin, b, new)))


def test_thin_memory_without_base_tensors_is_refused(pair):
    with pytest.raises(ArtifactError, match="embeddings 'base' unavailable"):
        MemoryDecoder(pair[1], name="thin")


def test_thin_memory_refuses_base_tensors_in_another_dtype(tiny, pair):
    from tests.tiny_models import base_tensors_of

    with pytest.raises(ArtifactError, match="torch.float32 on cpu, the memory runs torch.bfloat16"):
        MemoryDecoder(pair[1], name="thin", dtype=torch.bfloat16, base_tensors=base_tensors_of(tiny["base"]))


def test_thin_memory_of_another_vocabulary_is_refused(tiny, pair):
    from tests.tiny_models import base_tensors_of

    shared = {k: v[:300] for k, v in base_tensors_of(tiny["base"]).items()}
    with pytest.raises(ArtifactError, match=r"embed_tokens.weight has shape \(300, 128\), config implies \(320, 128\)"):
        MemoryDecoder(pair[1], name="thin", base_tensors=shared)


def test_a_thin_memory_scores_on_the_bases_embedding_and_head(tiny, tmp_path):
    """Offline scoring (compare, calm's evaluation) loads a thin memory with the base's embedding and head: it
    gives its full copy's logits, where transformers alone would leave both freshly initialised."""
    from transformers import AutoModelForCausalLM

    from memories.decoder.evaluate import load_memory_model
    from tests.tiny_models import base_embedding_pair

    base = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    full, thin = base_embedding_pair(tiny["beta"], tiny["base"], tmp_path)
    ids = [5, 9, 11, 3, 7]
    expected = hf_last(load_memory_model(full, base), ids)
    torch.testing.assert_close(hf_last(load_memory_model(thin, base), ids), expected)
    assert not torch.allclose(hf_last(AutoModelForCausalLM.from_pretrained(thin).eval(), ids), expected, atol=1e-3)
