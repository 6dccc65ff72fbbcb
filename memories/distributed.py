"""Running build stages under ``torchrun``: which process this is, and how processes meet.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` for every process it starts; without them the build is a single
process and every helper here is a no-op. The datastore and training split
their work by rank; the other stages run on rank 0 while the rest wait, then
find the finished output by its fingerprint (``on_main``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This process's GPU where there is one (NCCL), the CPU otherwise (gloo)."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def world() -> World:
    """The process group this process belongs to, joined on first call when torchrun started it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    w = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return w


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers over all processes (the list itself when alone)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def on_main(fn: Callable[[], T]) -> T:
    """Run a stage on rank 0; the other ranks wait, then call ``fn`` too, which finds
    the stage complete by its fingerprint and only reads its record."""
    w = world()
    if w.size == 1:
        return fn()
    result = fn() if w.main else None
    barrier()
    return result if w.main else fn()
