"""``memserve serve``'s flags, ServeOptions and RequestLimits come from one place (server/config.py)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from server.cli import build_parser
from server.config import RequestLimits, ServeOptions, add_serve_arguments


def parse(*argv: str) -> ServeOptions:
    return ServeOptions.from_cli(build_parser().parse_args(["serve", *argv]))


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch):
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)


def test_no_flags_give_the_dataclass_defaults():
    assert parse() == ServeOptions()
    assert parse().limits == RequestLimits() == RequestLimits(4 << 20, 16)


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    settings = {f.name for f in fields(ServeOptions) if f.name != "limits"} | {f.name for f in fields(RequestLimits)}
    assert dests == settings


def test_flags_reach_their_fields():
    opts = parse(
        "--model", "/m", "--memory", "a=/x", "--memory", "b=/y", "--port", "9001", "--default-memory-weight", "0.3",
        "--admin-insecure-local", "--max-loras", "0", "--max-lora-rank", "32", "--calm", "off", "--memory-kv-budget", "1024",
        "--reconcile-interval", "2.5", "--max-request-bytes", "100", "--max-n", "3",
        "--shutdown-grace", "0", "--workdir", "/w", "--", "--dtype", "float32",
    )  # fmt: skip
    assert opts.model == "/m" and opts.memories == [("a", "/x"), ("b", "/y")] and opts.port == 9001
    assert opts.default_memory_weight == 0.3 and opts.admin_insecure_local is True and opts.max_loras == 0
    assert opts.max_lora_rank == 32 and opts.calm == "off" and opts.memory_kv_budget_bytes == 1024 and opts.reconcile_interval == 2.5
    assert opts.limits == RequestLimits(max_request_bytes=100, max_n=3)
    assert opts.shutdown_grace == 0.0 and opts.workdir == Path("/w")
    assert opts.engine_args == ["--dtype", "float32"]  # the '--' itself is not vLLM's


@pytest.mark.parametrize("argv", [["--default-memory-weight", "1.5"], ["--max-loras", "-1"], ["--max-lora-rank", "7"], ["--memory", "noequals"], ["--port", "x"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])


def test_admin_token_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("MEMSERVE_ADMIN_TOKEN", "from-env")
    assert parse().admin_token == "from-env"
    assert parse("--admin-token", "flag").admin_token == "flag"
