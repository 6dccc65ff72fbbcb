"""How a token stream is cut into model inputs, shared by every stage.

Each stream position ``t`` (predicting token ``t + 1``) is scored exactly once,
in the window that gives it the longest context: a window feeds at most
``context`` tokens and scores its last ``stride`` positions (all of them in
the first window). The datastore, the kNN targets, training and evaluation all
use this one cut, so "row i of the datastore" and "position i of the stream"
are the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    first: int  # first scored position (>= begin)
    end: int  # one past the last input token and last scored position

    @property
    def scored(self) -> int:
        return self.end - self.first

    @property
    def offset(self) -> int:
        """Index of the first scored position inside the window's input."""
        return self.first - self.begin


def iter_windows(length: int, context: int, stride: int) -> Iterator[Window]:
    """Windows over a stream of ``length`` tokens; positions 0 .. length-2 are scored."""
    if context < 1 or stride < 1 or stride > context:
        raise ValueError(f"need 1 <= stride <= context, got context={context}, stride={stride}")
    positions = length - 1
    first = 0
    while first < positions:
        end = min(first + stride, positions) if first else min(context, positions)
        yield Window(max(0, end - context), first, end)
        first = end


def shard_windows(windows: list[Window], shard: int, shards: int) -> list[Window]:
    """Contiguous block ``shard`` of ``shards``: concatenating the shards in order
    gives the stream order back."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} not in 0..{shards - 1}")
    n = len(windows)
    return windows[shard * n // shards : (shard + 1) * n // shards]
