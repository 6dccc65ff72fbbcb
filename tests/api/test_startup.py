"""A server asked to start with a bad memory refuses, names the problem, and never listens."""

import shutil
import subprocess
import sys

import pytest

from server.launcher import ROOT, server_env
from tests.tiny_models import build_llama, build_tokenizer


def start(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "1", *args], cwd=ROOT, env=server_env(tmp_path), capture_output=True, text=True, timeout=300)


def test_wrong_tokenizer_refused_before_engine_start(tiny, tmp_path):
    other = build_tokenizer(tmp_path / "tok", vocab_size=300)
    mem = build_llama(tmp_path / "mem", other, layers=1, seed=4, vocab_size=400)
    r = start(tmp_path, "--model", str(tiny["base"]), "--memory", f"alpha={tiny['alpha']}", "--memory", f"odd={mem}")
    assert r.returncode == 2
    assert "memory 'odd': tokenizer differs from the base's" in r.stderr
    assert "Initializing a V1 LLM engine" not in r.stderr


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_bad_memory_dirs_refused(tiny, tmp_path, problem):
    path = tmp_path / "mem"
    if problem == "corrupt":
        shutil.copytree(tiny["alpha"], path)
        (path / "model.safetensors").write_bytes(b"garbage")
    r = start(tmp_path, "--model", str(tiny["base"]), "--memory", f"m={path}")
    assert r.returncode == 2
    assert {"missing": "memory 'm': not a directory", "corrupt": "memory 'm': unreadable safetensors"}[problem] in r.stderr


def test_bad_cli_values(tiny, tmp_path):
    r = start(tmp_path, "--model", str(tiny["base"]), "--memory", "no-equals-sign")
    assert r.returncode == 2 and "expected NAME=DIR" in r.stderr
    r = start(tmp_path, "--model", str(tiny["base"]), "--default-memory-weight", "1.5")
    assert r.returncode == 2 and "must be in [0, 1]" in r.stderr


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-loras", "0"], "memory 'ada': LoRA memories are disabled on this server: start it with --max-loras N"),
        (["--max-loras", "1", "--max-lora-rank", "1"], "memory 'ada': rank above the server's limit: adapter r 8, server --max-lora-rank 1"),
    ],
)
def test_lora_memory_refused_at_start_up(tiny, tmp_path, flags, message):
    from tests.tiny_models import build_lora

    lora = build_lora(tmp_path / "ada", tiny["base"], rank=8)
    r = start(tmp_path, "--model", str(tiny["base"]), "--memory", f"ada={lora}", *flags)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Initializing a V1 LLM engine" not in r.stderr


@pytest.mark.parametrize("flags, named", [(["--", "--async-scheduling"], "--async-scheduling"), (["--", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], "--speculative-config")])
def test_engine_flags_memories_cannot_run_under_are_refused(tiny, tmp_path, flags, named):
    r = start(tmp_path, "--model", str(tiny["base"]), "--memory", f"alpha={tiny['alpha']}", *flags)
    assert r.returncode == 2
    assert f"refusing to start: {named}" in r.stderr
    assert "Initializing a V1 LLM engine" not in r.stderr
