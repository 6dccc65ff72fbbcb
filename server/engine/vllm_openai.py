"""vLLM's OpenAI layer, as the API process uses it: the one door from the API process into vLLM.

memserve serves vLLM's own request models and serving classes; every name the
API process needs from vLLM is imported here, so that the rest of the API
process (``server/api``, ``server/serving``) imports vLLM through this module
only (tests/unit/test_layout.py keeps it so).
"""

from __future__ import annotations

from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect
from vllm.exceptions import VLLMError
from vllm.v1.engine.exceptions import EngineDeadError

__all__ = [
    "ChatCompletionRequest", "CompletionRequest", "EngineDeadError", "ErrorResponse", "ModelCard", "StreamOptions",
    "VLLMError", "create_error_response", "init_app_state", "listen_for_disconnect",
]  # fmt: skip
