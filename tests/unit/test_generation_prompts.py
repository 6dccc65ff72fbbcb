"""Prompts an admin sends to the generator: every refusal is a 400 naming ``prompts``, before anything is generated."""

import asyncio

import pytest

from memories.lora.generate import PromptError, validate_prompts
from server.errors import BadRequest
from server.serving.generation import MemoryGeneration


class _Generator:
    sha256, max_prompts = "ab" * 32, 8


class _Catalog:
    store = None  # never reached: the prompts are refused first

    def get(self, name):
        return None


@pytest.mark.parametrize("prompt", ["\ud800", "the cell \udfff gene"])
def test_a_lone_surrogate_is_not_a_prompt(prompt):
    with pytest.raises(PromptError, match=r"prompt 1 is not valid Unicode text: surrogates not allowed"):
        validate_prompts(["the cell", prompt])


def test_the_admin_refusal_names_prompts():
    with pytest.raises(BadRequest) as e:
        asyncio.run(MemoryGeneration(_Generator(), _Catalog()).create("m", ["ok", "\ud800"]))
    assert e.value.param == "prompts" and "prompt 1 is not valid Unicode text" in str(e.value)
