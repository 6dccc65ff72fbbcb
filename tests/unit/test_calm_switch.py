"""--calm: when the engine serves the calm model that calm memories need."""

import pytest
from transformers import AutoTokenizer

from server.engine import client as engine
from server.startup import serves_calm
from server.serving.store import DesiredMemory, MemoryStore
from tests.tiny_models import build_calm, build_llama

LLAMA = {"architectures": ["LlamaForCausalLM"]}
QWEN = {"architectures": ["Qwen2ForCausalLM"]}


@pytest.fixture
def calm_memory(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    return build_calm(tmp_path / "root" / "cal", tiny["base"], build_llama(tmp_path / "aug", tok, layers=1, seed=4), [(0, 0)])


def test_auto_is_on_for_a_llama_base_on_cpu(monkeypatch, tiny):
    monkeypatch.setattr(engine, "on_cpu", lambda: True)
    assert serves_calm("auto", LLAMA, [("alpha", str(tiny["alpha"]))], None) is True
    assert serves_calm("auto", QWEN, [], None) is False  # the calm model wraps Llama only
    assert serves_calm("off", LLAMA, [], None) is False


def test_auto_on_a_gpu_waits_for_a_calm_memory_at_start_up(monkeypatch, tiny, tmp_path, calm_memory):
    monkeypatch.setattr(engine, "on_cpu", lambda: False)
    decoders = [("alpha", str(tiny["alpha"]))]
    assert serves_calm("auto", LLAMA, decoders, None) is False
    assert serves_calm("auto", LLAMA, [*decoders, ("cal", str(calm_memory))], None) is True
    store = MemoryStore(tmp_path / "root")
    store.put(DesiredMemory("cal", "cal", None, "x"))
    assert serves_calm("auto", LLAMA, decoders, store) is True  # a persisted calm memory will be restored
    assert serves_calm("on", LLAMA, [], None) is True


def test_on_with_another_architecture_is_refused(monkeypatch):
    monkeypatch.setattr(engine, "on_cpu", lambda: True)
    with pytest.raises(ValueError, match="--calm on needs a base of architecture LlamaForCausalLM; this base is Qwen2ForCausalLM"):
        serves_calm("on", QWEN, [], None)
