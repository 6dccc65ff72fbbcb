"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

memserve's model (``server/worker/model.py``) is registered by its import path,
one architecture name per base architecture it serves, so the API process
learns the names without importing the worker-side code behind them; vLLM
imports that where the model is built.
"""

from __future__ import annotations

from server.engine.keys import MODEL_ARCHITECTURES, MODEL_MODULE


def register() -> None:
    """Make memserve's model known to vLLM in this process (idempotent)."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for name in MODEL_ARCHITECTURES.values():
        if name not in known:
            ModelRegistry.register_model(name, f"{MODEL_MODULE}:{name}")
