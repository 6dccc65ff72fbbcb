"""Engine set-ups that would serve memory rows wrongly are refused at start, each naming its flag."""

from __future__ import annotations

from argparse import Namespace

import pytest

from server.engine.client import unsupported


@pytest.fixture(autouse=True)
def _v1_runner(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)


def plain(**kw) -> Namespace:
    return Namespace(**{"async_scheduling": False, "speculative_config": None, "attention_backend": None, **kw})


def test_a_plain_engine_is_served():
    assert unsupported(plain()) == []  # these machines run the CPU platform


@pytest.mark.parametrize(
    "args, flag",
    [(plain(async_scheduling=True), "--async-scheduling"), (plain(speculative_config={"method": "ngram"}), "--speculative-config")],
)
def test_each_unsupported_flag_is_named(args, flag):
    (reason,) = unsupported(args)
    assert reason.startswith(flag)


def test_model_runner_v2_is_named(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    (reason,) = unsupported(plain())
    assert "VLLM_USE_V2_MODEL_RUNNER=1" in reason and "V1 logits processor" in reason


def test_a_gpu_needs_an_attention_backend_with_token_spans(monkeypatch):
    """memserve's model finds each row's tokens in the attention metadata (query_start_loc), for calm and decoder memories alike."""
    import server.engine.client as client

    monkeypatch.setattr(client, "on_cpu", lambda: False)
    (reason,) = unsupported(plain())
    assert "query_start_loc" in reason and "--attention-backend" in reason
    assert unsupported(plain(attention_backend="FLASH_ATTN")) == []
