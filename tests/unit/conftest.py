"""The tiny base's tokenizer and config, as the artifact checks read them."""

import json

import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def base_tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["tokenizer"])


@pytest.fixture(scope="module")
def base_config(tiny):
    return json.loads((tiny["base"] / "config.json").read_text())
