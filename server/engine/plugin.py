"""The ``vllm.general_plugins`` entry point: vLLM calls :func:`register` in every process it starts.

The calm model is registered by its import path, so the API process learns the
architecture's name without importing the worker-side code behind it; vLLM
imports that where the model is built.
"""

from __future__ import annotations

from server.engine.keys import CALM_ARCHITECTURE, CALM_MODEL


def register() -> None:
    """Make the calm model known to vLLM in this process (idempotent)."""
    from vllm import ModelRegistry

    if CALM_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(CALM_ARCHITECTURE, CALM_MODEL)
