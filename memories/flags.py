"""Argument types every memserve command line shares: a bad value is one argparse error naming it."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def positive(text: str) -> int:
    """A whole number of at least 1."""
    n = _number(text, int, "an integer")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def count(text: str) -> int:
    """A whole number of 0 or more."""
    n = _number(text, int, "an integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_corpus_arguments(parser: argparse.ArgumentParser, defaults, title: str = "corpus and windows") -> argparse._ArgumentGroup:
    """The corpus stage's flags, which every kind's build shares (``memories/corpus.py`` reads them from the config).

    ``defaults`` is the build's config object; the group is returned for a kind's own additions.
    """
    d = defaults
    g = parser.add_argument_group(title)
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap on training tokens (default %(default)s)")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="cap on validation and test tokens each (default %(default)s)")
    g.add_argument("--validation-fraction", type=float, default=d.validation_fraction, help="share of documents in the validation split, which chooses λ, temperatures and early stops (default %(default)s)")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of documents in the test split, which the reported test perplexity reads (default %(default)s)")
    g.add_argument("--context", type=int, default=d.context, help="tokens per window (default %(default)s)")
    g.add_argument("--stride", type=int, default=d.stride, help="new positions per window (default %(default)s)")
    return g


def add_threads_argument(group) -> None:
    group.add_argument("--threads", type=int, default=0, help="CPU threads; 0: all cores (default %(default)s)")
