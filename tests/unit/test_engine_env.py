"""Start-up noise: the environment memserve gives vLLM's processes silences a warning nobody can act on, and only that."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.engine.client import prepare_environment

WARN = (
    "import warnings\n"
    "warnings.warn('`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead', FutureWarning)\n"
    "warnings.warn('a warning that matters', FutureWarning)\n"
)


@pytest.fixture
def environ(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    monkeypatch.setattr(os, "environ", env)
    return env


def _child(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WARN], env=env, capture_output=True, text=True)


def test_engine_processes_skip_the_deprecated_alias_warning_only(environ, tmp_path):
    prepare_environment(tmp_path)
    err = _child(environ).stderr
    assert "reduce_op" not in err
    assert "a warning that matters" in err


def test_users_own_warning_filters_win(environ, tmp_path):
    environ["PYTHONWARNINGS"] = "error::FutureWarning"
    prepare_environment(tmp_path)
    prepare_environment(tmp_path)  # a second call adds nothing
    assert environ["PYTHONWARNINGS"].count("reduce_op") == 1
    child = _child(environ)
    assert child.returncode != 0 and "reduce_op" in child.stderr


def test_a_deep_temp_dir_gives_vllm_a_short_socket_folder(tmp_path):
    from server.engine.client import SOCKET_DIR_MAX, socket_dir

    deep = tmp_path / ("d" * 80)
    short = socket_dir(deep)
    assert short != deep and short.is_dir() and len(str(short)) <= SOCKET_DIR_MAX
    assert len(f"{short}/{'0' * 36}") <= 107  # the longest path vLLM binds: TMPDIR/<uuid4>
    assert socket_dir(Path("/tmp/m")) == Path("/tmp/m")  # a short one is kept
    short.rmdir()
