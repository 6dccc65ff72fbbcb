"""--max-loras: the operator's value, else LoRA on only when a start-up memory is a lora memory."""

from server.runtime import AUTO_MAX_LORAS, _max_loras
from server.store import DesiredMemory, MemoryStore
from tests.tiny_models import build_lora


def test_lora_is_on_only_when_a_start_up_memory_needs_it(tiny, tmp_path):
    decoders = [("alpha", str(tiny["alpha"])), ("gone", str(tmp_path / "missing"))]
    assert _max_loras(None, decoders, None) == 0
    lora = build_lora(tmp_path / "root" / "ada", tiny["base"])
    assert _max_loras(None, [*decoders, ("ada", str(lora))], None) == AUTO_MAX_LORAS
    assert _max_loras(0, [("ada", str(lora))], None) == 0 and _max_loras(2, decoders, None) == 2
    store = MemoryStore(tmp_path / "root")
    assert _max_loras(None, decoders, store) == 0
    store.put(DesiredMemory("ada", "ada", None, "x"))
    assert _max_loras(None, decoders, store) == AUTO_MAX_LORAS  # a persisted lora memory will be restored


def test_a_generator_turns_lora_on_unless_the_operator_says_otherwise(tiny, tmp_path):
    decoders = [("alpha", str(tiny["alpha"]))]
    assert _max_loras(None, decoders, None, tmp_path / "generator") == AUTO_MAX_LORAS
    assert _max_loras(0, decoders, None, tmp_path / "generator") == 0
    assert _max_loras(2, decoders, None, tmp_path / "generator") == 2
