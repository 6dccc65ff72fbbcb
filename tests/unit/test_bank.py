"""Decoder memory slots (server/worker/bank.py): which memories fit, and when a slot is free again."""

import pytest

from memories.artifact import ArtifactError
from server.worker.bank import MemoryBank
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
    shallow = MemoryBank(bank.shape, bank.embed.dtype, bank.rotary, 1, 1, 1, False, lambda i: bank.attn[0])
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
