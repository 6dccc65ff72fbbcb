"""Real servers: every test here is marked ``engine``; a server with every kind and LoRA on, computing prompts in 32-token chunks, shared by the chunked-prefill and load tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.launcher import ServerProcess
from tests.conftest import FP32
from tests.tiny_models import build_calm, build_llama, build_lora

ENGINE_FREE = {"test_startup.py"}  # start-up refusals: the server exits before it starts an engine


def pytest_collection_modifyitems(config, items):
    """Mark every test of this folder that starts a real vLLM engine: ``pytest -m "not engine"`` runs the fast suite."""
    here = Path(__file__).parent
    for item in items:
        if item.path.parent == here and item.path.name not in ENGINE_FREE:
            item.add_marker(pytest.mark.engine)


LONG = [(7 * i + 3) % 300 + 10 for i in range(100)]  # 100 tokens: four chunks of at most 32


@pytest.fixture(scope="session")
def calm_dir(tiny, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chunked-calm")
    augment = build_llama(root / "aug", AutoTokenizer.from_pretrained(tiny["tokenizer"]), layers=2, seed=41)
    return build_calm(root / "cal", tiny["base"], augment, [(1, 0), (0, 1)], seed=4)


@pytest.fixture(scope="session")
def lora_dir(tiny, tmp_path_factory):
    return build_lora(tmp_path_factory.mktemp("chunked-lora") / "ada", tiny["base"], rank=8, seed=11)


@pytest.fixture(scope="session")
def chunked(tiny, calm_dir, lora_dir, tmp_path_factory):
    """Decoder memory ``alpha``, calm memory ``cal``, lora memory ``ada``; prompts computed 32 tokens a step."""
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory", f"alpha={tiny['alpha']}", "--memory", f"cal={calm_dir}", "--memory", f"ada={lora_dir}", "--max-loras", "1", *FP32]
    args += ["--enable-chunked-prefill", "--max-num-batched-tokens", "32", "--max-num-seqs", "8"]
    with ServerProcess(args, tmp_path_factory.mktemp("chunked")).running() as proc:
        yield proc
