"""The compute bound: how fast fusion can be if a memory costs exactly its arithmetic."""

from __future__ import annotations

from pathlib import Path

from memories.flops import flops_per_token, memory_flops_per_token


def compute_bound(base_dir: str | Path, memory_dir: str | Path) -> float:
    """Best possible memory ÷ base throughput: base FLOPs ÷ (base + memory FLOPs)."""
    base = flops_per_token(base_dir)
    return base / (base + memory_flops_per_token(memory_dir))


def mixture_bound(base_dir: str | Path, memory_dirs: list[str | Path]) -> float:
    """Best possible throughput of requests that each fuse all of ``memory_dirs`` (a mixture), ÷ the base's:
    base FLOPs ÷ (base + every memory's FLOPs). One memory is ``compute_bound``."""
    base = flops_per_token(base_dir)
    return base / (base + sum(memory_flops_per_token(d) for d in memory_dirs))
