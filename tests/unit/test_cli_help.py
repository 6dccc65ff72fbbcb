"""Every flag of every ``memserve`` sub-command explains itself and its default in ``--help``."""

from __future__ import annotations

import argparse

import pytest

from bench.run import build_parser as bench_parser
from server.cli import build_parser

# A flag's default that needs no words: off for a switch, nothing for a repeatable list.
SELF_EVIDENT = (False, [])


def _parsers(parser: argparse.ArgumentParser, prog: str = "memserve"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def _flags():
    for prog, parser in (*_parsers(build_parser()), *_parsers(bench_parser(), "memserve bench")):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            yield pytest.param(parser, action, id=f"{prog} {'/'.join(action.option_strings) or action.dest}")


@pytest.fixture(autouse=True)
def _no_env_defaults(monkeypatch):
    # --url and --token take their defaults from the environment
    monkeypatch.delenv("MEMSERVE_URL", raising=False)
    monkeypatch.delenv("MEMSERVE_ADMIN_TOKEN", raising=False)


@pytest.mark.parametrize("parser, action", _flags())
def test_every_flag_has_help_that_states_its_default(parser, action):
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    assert text.strip(), "no help text"
    if not action.option_strings or action.required or action.default in SELF_EVIDENT:
        return
    assert "default" in text, f"help does not say what happens without the flag: {text!r}"
    if action.default is not None:
        assert str(action.default) in text, f"help does not show the default {action.default!r}: {text!r}"


def test_memory_help_names_every_kind_of_sub_command():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    summary = next(a.help for a in commands._choices_actions if a.dest == "memory")
    for word in ("build", "load", "unload", "list"):
        assert word in summary


def test_engine_flags_after_double_dash_reach_vllm_unchanged():
    opts = build_parser().parse_args(["serve", "--port", "9000", "--", "--kv-cache-memory-bytes", "4294967296"])
    assert opts.port == 9000
    assert opts.engine_args == ["--", "--kv-cache-memory-bytes", "4294967296"]
