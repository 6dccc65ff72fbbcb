"""Shared fixtures: tiny models built once per session, and a real memserve server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.launcher import ServerProcess
from tests.tiny_models import build_all


# vLLM-CPU would run the fp32 test models in bf16; the oracle comparisons need fp32 on both sides
FP32 = ["--", "--dtype", "float32"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server")
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory", f"alpha={tiny['alpha']}", "--memory", f"beta={tiny['beta']}"]
    args += ["--memory-kv-budget", "1500000"]  # fixed-size pools: alpha holds 5 sequences, beta 2
    args += [*FP32, "--enable-prompt-tokens-details"]  # usage reports prefix-cache hits (tests/api/test_prefix_cache.py)
    with ServerProcess(args, workdir).running() as proc:
        yield proc
