"""Shared fixtures: tiny models built once per session, a real memserve server on 127.0.0.1, and plain vLLM's answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.launcher import ROOT, ServerProcess
from tests.tiny_models import build_all


# vLLM-CPU would run the fp32 test models in bf16; the oracle comparisons need fp32 on both sides
FP32 = ["--", "--dtype", "float32"]

# session fixtures that start engines: every module that uses one runs on the same xdist worker (pyproject addopts)
SHARED_ENGINES = {"server", "chunked", "plain_vllm"}

# the greedy prompts the oracle tests share, and how many tokens each generates
PROMPTS = ["the cell protein gene", "court law contract party shall", "market share price"]
MAX_TOKENS = 12


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Group tests for ``--dist loadgroup``: a module stays on one worker; all modules using a shared engine on one."""

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    def uses_shared(item) -> bool:
        defs = item._fixtureinfo.name2fixturedefs
        return any(defs[name][-1].scope == "session" for name in SHARED_ENGINES & set(defs))

    shared = {module(item) for item in items if uses_shared(item)}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("shared-engines" if module(item) in shared else module(item)))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server")
    args = ["--model", str(tiny["base"]), "--served-model-name", "tiny-base", "--max-model-len", "512"]
    args += ["--memory", f"alpha={tiny['alpha']}", "--memory", f"beta={tiny['beta']}"]
    args += [*FP32, "--enable-prompt-tokens-details"]  # usage reports prefix-cache hits (tests/api/test_prefix_cache.py)
    with ServerProcess(args, workdir).running() as proc:
        yield proc


@pytest.fixture(scope="session")
def prompt_ids(tiny) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def plain_vllm(tiny, prompt_ids, tmp_path_factory) -> dict[str, list[dict]]:
    """Plain vLLM's greedy tokens and logprobs for ``prompt_ids``: ``"plain"`` without LoRA, ``"lora"`` with multi-LoRA on.

    Both runs start at once (two processes, each vLLM without memserve), once per session. Their
    output goes to files, not pipes: a pipe nobody reads yet would stall the second run's logging.
    """
    logs = tmp_path_factory.mktemp("plain-vllm")
    runs = {}
    for name, flags in (("plain", []), ("lora", ["--enable-lora"])):
        cmd = [sys.executable, "-m", "tests.plain_vllm", str(tiny["base"]), str(MAX_TOKENS), json.dumps(prompt_ids), *flags]
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            runs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
    results = {}
    for name, proc in runs.items():
        proc.wait(timeout=600)
        line = next((ln for ln in (logs / f"{name}.out").read_text().splitlines() if ln.startswith("RESULT ")), None)
        assert line, (logs / f"{name}.err").read_text()[-3000:]
        results[name] = json.loads(line[len("RESULT ") :])
    return results
