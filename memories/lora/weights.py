"""LoRA weights ⇄ a grid of fixed-size "weight tokens", and the generator's standardisation.

The generator predicts every LoRA matrix at once, so all of them are cut
into one shape: for each target (layer, module) the matrices ``lora_A``
([r, in]) and ``lora_B``ᵀ ([r, out]) are split along their long axis into
chunks of ``chunk`` columns; a chunk, flattened, is one token of
``r * chunk`` values. A last, partial chunk is zero-padded and its padding
is marked in a mask, so the loss only sees real values and the inverse
(``untokenise``) is exact.

Standardisation is per collection, not per sample, so that generation can
undo it without knowing the answer: every value has the collection's mean
subtracted (so a zero output means "the average checkpoint") and every token
position is divided by one scale, the standard deviation of its deviations
over the collection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def peft_key(layer: int, module: str, matrix: str) -> str:
    """PEFT's tensor name for a Llama-style attention projection (``matrix`` is "A" or "B")."""
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{matrix}.weight"


@dataclass(frozen=True)
class Slot:
    """One matrix of the adapter in the grid: rows [start, start + count) hold its chunks."""

    layer: int
    module: str
    matrix: str  # "A": lora_A [r, width]; "B": lora_B [width, r], stored transposed
    width: int
    start: int
    count: int

    @property
    def key(self) -> str:
        return peft_key(self.layer, self.module, self.matrix)


@dataclass(frozen=True)
class Layout:
    """Where every matrix of one adapter shape lives in the token grid."""

    rank: int
    chunk: int
    slots: tuple[Slot, ...]

    @classmethod
    def build(cls, layers: list[int], modules: dict[str, tuple[int, int]], rank: int, chunk: int) -> "Layout":
        """``modules``: name → (in_features, out_features) of the projection."""
        slots, start = [], 0
        for layer in layers:
            for module, (fan_in, fan_out) in modules.items():
                for matrix, width in (("A", fan_in), ("B", fan_out)):
                    count = math.ceil(width / chunk)
                    slots.append(Slot(layer, module, matrix, width, start, count))
                    start += count
        return cls(rank, chunk, tuple(slots))

    @property
    def tokens(self) -> int:
        return sum(s.count for s in self.slots)

    @property
    def token_dim(self) -> int:
        return self.rank * self.chunk

    def to_dict(self) -> dict:
        return {"rank": self.rank, "chunk": self.chunk, "slots": [vars(s) for s in self.slots]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(int(d["rank"]), int(d["chunk"]), tuple(Slot(**s) for s in d["slots"]))

    def mask(self) -> torch.Tensor:
        """[tokens, token_dim] bool: True on real values, False on padding."""
        m = torch.zeros(self.tokens, self.rank, self.chunk, dtype=torch.bool)
        for s in self.slots:
            for j in range(s.count):
                m[s.start + j, :, : min(self.chunk, s.width - j * self.chunk)] = True
        return m.reshape(self.tokens, self.token_dim)


def tokenise(layout: Layout, adapter: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT tensors (``[..., r, in]`` for A, ``[..., out, r]`` for B; leading axes kept) → ``[..., tokens, token_dim]``."""
    lead = next(iter(adapter.values())).shape[:-2]
    grid = torch.zeros(*lead, layout.tokens, layout.rank, layout.chunk, dtype=torch.float32)
    for s in layout.slots:
        w = adapter[s.key].float()
        rows = w if s.matrix == "A" else w.transpose(-1, -2)  # [..., r, width]
        if rows.shape[-2:] != (layout.rank, s.width):
            raise ValueError(f"{s.key}: expected {[layout.rank, s.width]} (after transposing B), got {list(rows.shape[-2:])}")
        pad = s.count * layout.chunk - s.width
        rows = torch.nn.functional.pad(rows, (0, pad))
        chunks = rows.reshape(*lead, layout.rank, s.count, layout.chunk).movedim(-2, -3)  # [..., count, r, chunk]
        grid[..., s.start : s.start + s.count, :, :] = chunks
    return grid.reshape(*lead, layout.tokens, layout.token_dim)


def untokenise(layout: Layout, grid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of ``tokenise``: padding is dropped, A and B come back in PEFT's shapes."""
    lead = grid.shape[:-2]
    g = grid.reshape(*lead, layout.tokens, layout.rank, layout.chunk)
    out = {}
    for s in layout.slots:
        chunks = g[..., s.start : s.start + s.count, :, :].movedim(-3, -2)  # [..., r, count, chunk]
        rows = chunks.reshape(*lead, layout.rank, s.count * layout.chunk)[..., : s.width]
        out[s.key] = (rows if s.matrix == "A" else rows.transpose(-1, -2)).contiguous()
    return out


@dataclass
class Standardiser:
    """Per-value collection mean and per-token scale; ``apply``/``invert`` are exact inverses."""

    mean: torch.Tensor  # [tokens, token_dim]
    scale: torch.Tensor  # [tokens, 1]

    @classmethod
    def fit(cls, grids: torch.Tensor, mask: torch.Tensor, floor: float = 1e-6) -> "Standardiser":
        """``grids``: [n, tokens, token_dim] over the whole collection."""
        mean = grids.mean(0)
        dev = (grids - mean) * mask
        count = mask.sum(-1).clamp(min=1) * grids.shape[0]
        scale = (dev.pow(2).sum((0, 2)) / count).sqrt().clamp(min=floor).unsqueeze(-1)
        return cls(mean * mask, scale)

    def apply(self, grids: torch.Tensor) -> torch.Tensor:
        return (grids - self.mean) / self.scale

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.mean

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"standardiser.mean": self.mean.contiguous(), "standardiser.scale": self.scale.contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Standardiser":
        return cls(t["standardiser.mean"].float(), t["standardiser.scale"].float())


def lora_deltas(adapter: dict[str, torch.Tensor], scaling: float) -> dict[tuple[int, str], torch.Tensor]:
    """ΔW = scaling · B·A per (layer, module): what the adapter adds to each projection's weight."""
    out = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        layer = int(key.split(".layers.")[1].split(".")[0])
        module = key.split(".self_attn.")[1].split(".")[0]
        out[(layer, module)] = scaling * (b.float() @ a.float())
    return out
