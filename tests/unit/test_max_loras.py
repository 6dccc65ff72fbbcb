"""--max-loras: the operator's value, else LoRA on only when a start-up memory is a lora memory."""

from server.startup import AUTO_MAX_LORAS, choose_max_loras
from server.serving.store import DesiredMemory, MemoryStore
from tests.tiny_models import build_lora


def test_lora_is_on_only_when_a_start_up_memory_needs_it(tiny, tmp_path):
    decoders = [("alpha", str(tiny["alpha"])), ("gone", str(tmp_path / "missing"))]
    assert choose_max_loras(None, decoders, None) == 0
    lora = build_lora(tmp_path / "root" / "ada", tiny["base"])
    assert choose_max_loras(None, [*decoders, ("ada", str(lora))], None) == AUTO_MAX_LORAS
    assert choose_max_loras(0, [("ada", str(lora))], None) == 0 and choose_max_loras(2, decoders, None) == 2
    store = MemoryStore(tmp_path / "root")
    assert choose_max_loras(None, decoders, store) == 0
    store.put(DesiredMemory("ada", "ada", None, "x"))
    assert choose_max_loras(None, decoders, store) == AUTO_MAX_LORAS  # a persisted lora memory will be restored


def test_a_generator_turns_lora_on_unless_the_operator_says_otherwise(tiny, tmp_path):
    decoders = [("alpha", str(tiny["alpha"]))]
    assert choose_max_loras(None, decoders, None, tmp_path / "generator") == AUTO_MAX_LORAS
    assert choose_max_loras(0, decoders, None, tmp_path / "generator") == 0
    assert choose_max_loras(2, decoders, None, tmp_path / "generator") == 2
