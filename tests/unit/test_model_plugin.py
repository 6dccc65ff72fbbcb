"""memserve's model: one class per base architecture it serves, registered by the plugin and chosen by the engine args."""

from __future__ import annotations

import importlib
import json
import os

import pytest

from server.engine.keys import MODEL_ARCHITECTURES, MODEL_MODULE


def test_every_architecture_is_vllms_own_class_extended():
    from vllm import ModelRegistry

    from server.engine.plugin import register
    from server.worker.model import MemserveModel

    register()
    module = importlib.import_module(MODEL_MODULE)
    for base, name in MODEL_ARCHITECTURES.items():
        assert name in ModelRegistry.get_supported_archs()
        cls = getattr(module, name)
        assert issubclass(cls, MemserveModel)
        assert base in [c.__name__ for c in cls.__mro__ if c.__module__.startswith("vllm.model_executor.models.")]


@pytest.fixture
def environ(monkeypatch):
    """engine_args sets the CPU thread layout in the environment: keep it to this test."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM"])
def test_the_engine_serves_the_base_through_memserves_model_where_it_has_one(architecture, environ):
    from server.engine.client import engine_args
    from server.engine.keys import ROWS_PROCESSOR

    args = engine_args("/m", "base", None, [], architecture=architecture, decoder_slots=3, decoder_layers=0, mixture_size=2)
    assert args.logits_processors == [ROWS_PROCESSOR] and args.enforce_eager  # calm's hooks need eager execution
    assert not engine_args("/m", "base", None, [], architecture=architecture, calm=False).enforce_eager  # vLLM-CPU compiles the backbone
    overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else json.loads(args.hf_overrides or "null")
    if architecture in MODEL_ARCHITECTURES:
        assert overrides == {"architectures": [MODEL_ARCHITECTURES[architecture]], "memserve_memory_slots": 3, "memserve_memory_layers": 0, "memserve_memory_lanes": 2}
    else:
        assert not overrides  # vLLM's own class: decoder and calm memories are refused at load


def test_under_model_runner_v2_no_v1_logits_processor_is_passed(environ):
    """V2 refuses V1 logits processors; memserve's model names its own model state instead (server/worker/v2_state.py)."""
    from server.engine.client import engine_args

    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    args = engine_args("/m", "base", None, [], architecture="LlamaForCausalLM", decoder_slots=3, calm=False)
    assert not args.logits_processors and args.worker_extension_cls
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    assert engine_args("/m", "base", None, [], architecture="LlamaForCausalLM", calm=False).logits_processors
