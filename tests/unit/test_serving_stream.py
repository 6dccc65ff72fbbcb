"""Stream bookkeeping of the serving layer with a fake engine stream."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from server.serving.completions import CompletionsServing
from server.serving.selection import Selection


class Memory:
    name = "alpha"

    def __init__(self):
        self.released = 0
        self.unloaded = asyncio.Event()
        self.prompt_tokens = self.completion_tokens = 0

    def release(self, rows=1):
        self.released += 1


class Chunks:
    """vLLM's stream: two chunks, a usage chunk, then an ``aclose`` that fails."""

    def __init__(self):
        self.items = [
            'data: {"model": "base", "choices": [{"text": "a"}]}\n\n',
            'data: {"model": "base", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n',
            "data: [DONE]\n\n",
        ]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    async def aclose(self):
        raise RuntimeError("engine stream failed to close")


def test_a_failing_close_still_releases_the_memory():
    memory = Memory()
    selection = Selection(memory, 0.5, "alpha")
    serving = CompletionsServing(SimpleNamespace(), catalog=None, base_name="base")

    async def consume():
        out = []
        with pytest.raises(RuntimeError, match="failed to close"):
            async for chunk in serving._stream(Chunks(), selection, "alpha", "/v1/completions", 0.0, hide_usage=True):
                out.append(chunk)
        return out

    out = asyncio.run(consume())
    assert memory.released == 1
    assert json.loads(out[0][6:])["model"] == "alpha"  # the memory's id, not the base's
    assert len(out) == 2 and out[-1] == "data: [DONE]\n\n"  # the usage chunk the client did not ask for is hidden
    assert (memory.prompt_tokens, memory.completion_tokens) == (3, 1)
