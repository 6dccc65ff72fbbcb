"""The composition: the only parameters CALM trains between two frozen models.

At each connection ``(a, b)`` the augmenting model's residual stream after its
layer ``a`` is projected to the base's width and becomes the keys and values
of a cross-attention whose queries are the base's residual stream after its
layer ``b``; the result, times a gate, is added back to that stream. The gate
starts at zero, so an untrained composition is exactly the base.

The cross-attention is causal: base position t sees the augmenting model's
states at positions 0..t only (the paper's public code passes no mask, so
there every position sees the future). Both models read the same tokens, so
position t of one is position t of the other.

These functions are the one copy of the formula: training and evaluation
(``memories.calm.hf``, on transformers models) and serving
(``memories.calm.runtime``, inside vLLM) both call :meth:`Connection.keys_values`
and :meth:`Connection.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from memories.artifact import ArtifactError, check_floating, finite_number, is_int
from memories.runner import rms_norm

COMPOSITION_FILE = "composition.safetensors"
AUGMENT_DIR = "augment"


@dataclass(frozen=True)
class CompositionSpec:
    """Shape of a composition; memory.json carries it (docs/CONTRACT.md, calm)."""

    connections: tuple[tuple[int, int], ...]  # (augment layer, base layer), 0-based, applied in this order
    augment_width: int
    base_width: int
    heads: int
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.base_width // self.heads

    def card_fields(self) -> dict:
        return {
            "connections": [list(c) for c in self.connections],
            "augment_width": self.augment_width,
            "base_width": self.base_width,
            "heads": self.heads,
            "rms_eps": self.eps,
        }

    @classmethod
    def from_card(cls, name: str, meta: dict) -> "CompositionSpec":
        """Read memory.json's calm fields, each of its exact JSON type: ``int()``/``float()`` would turn 1.7, true or "nan" into numbers the worker then builds from."""
        missing = [key for key in ("connections", "augment_width", "base_width", "heads") if key not in meta]
        if missing:
            raise ArtifactError(name, "memory.json calm fields missing or malformed", f"missing {', '.join(missing)}; needs connections [[augment_layer, base_layer], ...], augment_width, base_width, heads")
        for key in ("augment_width", "base_width", "heads"):
            if not is_int(meta[key]):
                raise ArtifactError(name, "memory.json calm fields missing or malformed", f"{key} is {meta[key]!r}, not an integer")
        spec = cls(_connections(name, meta["connections"]), meta["augment_width"], meta["base_width"], meta["heads"], _rms_eps(name, meta.get("rms_eps", 1e-5)))
        if min(spec.augment_width, spec.base_width, spec.heads) < 1 or spec.base_width % spec.heads:
            raise ArtifactError(name, "memory.json widths/heads invalid", f"base_width {spec.base_width} must be a positive multiple of heads {spec.heads}")
        return spec


# rms_eps is added to a mean square before its reciprocal square root: ≤ 0 can divide by zero, large values flatten the states
MAX_RMS_EPS = 0.1


def _rms_eps(name: str, value) -> float:
    eps = finite_number(name, "memory.json rms_eps", value)
    if not 0 < eps <= MAX_RMS_EPS:
        raise ArtifactError(name, "memory.json rms_eps out of range", f"{eps:g} not in (0, {MAX_RMS_EPS:g}]")
    return eps


def _connections(name: str, value) -> tuple[tuple[int, int], ...]:
    """A non-empty list of [augment_layer, base_layer] pairs of JSON integers (whether the layers exist is ``check_layers``)."""
    if not isinstance(value, list) or not value:
        raise ArtifactError(name, "memory.json connections is empty or not a list", f"{type(value).__name__}; a calm memory needs at least one [augment_layer, base_layer]")
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(is_int(x) for x in pair)):
            raise ArtifactError(name, "memory.json connections malformed", f"connection {i} is {pair!r}; each must be [augment_layer, base_layer], two integers")
    return tuple((a, b) for a, b in value)


def expected_tensors(spec: CompositionSpec) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor the composition file must hold, built without allocating (one connection on the meta device)."""
    with torch.device("meta"):
        one = Connection(spec).state_dict()
    return {f"connections.{i}.{key}": tuple(t.shape) for i in range(len(spec.connections)) for key, t in one.items()}


def check_composition_tensors(name: str, spec: CompositionSpec, tensors: dict[str, tuple]) -> None:
    """The composition holds exactly memory.json's connections: their count, every tensor's name and shape, floating dtypes.

    ``tensors`` maps name → (shape, dtype), from the safetensors header in the API
    process (nothing read, nothing allocated) or from the loaded tensors in the worker,
    so a card claiming thousands of connections is refused before anything is built for them.
    """
    count = len({key.split(".")[1] for key in tensors if key.startswith("connections.")})
    if count != len(spec.connections):
        raise ArtifactError(name, "connection count differs from the composition", f"memory.json has {len(spec.connections)} connections, {COMPOSITION_FILE} has {count}")
    expected = expected_tensors(spec)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(name, "composition does not match memory.json", f"missing {missing[:4]}, unexpected {extra[:4]} (for {len(spec.connections)} connections)")
    for key, (shape, dtype) in tensors.items():
        if tuple(shape) != expected[key]:
            raise ArtifactError(name, "composition does not match memory.json", f"{key} has shape {tuple(shape)}, memory.json implies {expected[key]}")
        check_floating(name, key, dtype)


def default_connections(n: int, augment_layers: int, base_layers: int) -> list[tuple[int, int]]:
    """``n`` connections spread evenly over both models, as the paper does.

    Augment layers end at its last layer (its most processed states); base
    layers are spread over the interior, so the base keeps layers after the
    last connection to use what it received.
    """
    if not 1 <= n <= min(augment_layers, base_layers):
        raise ValueError(f"connections must be in [1, {min(augment_layers, base_layers)}] for models of {augment_layers} and {base_layers} layers, got {n}")
    augment = [(i + 1) * augment_layers // n - 1 for i in range(n)]
    base = [(i + 1) * base_layers // (n + 1) - 1 for i in range(n)]
    return list(zip(augment, base))


class Connection(nn.Module):
    """One cross-attention from the augmenting model's layer into the base's."""

    def __init__(self, spec: CompositionSpec):
        super().__init__()
        d, h = spec.base_width, spec.heads
        self.heads, self.eps = h, spec.eps
        self.proj = nn.Linear(spec.augment_width, d, bias=False)
        self.kv_norm = nn.Parameter(torch.ones(d))
        self.q_norm = nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def keys_values(self, augment_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[..., heads, T, head_dim]`` from augment states ``[..., T, augment_width]``."""
        p = rms_norm(self.proj(augment_states), self.kv_norm, self.eps)
        return self._split(self.k(p)), self._split(self.v(p))

    def attend(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What to add to the base stream ``hidden`` ``[..., M, base_width]``.

        ``mask`` ``[..., M, T]`` (bool) says which augment positions each query sees:
        its own position and the ones before it.
        """
        q = self._split(self.q(rms_norm(hidden, self.q_norm, self.eps)))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(-3))
        out = out.transpose(-3, -2).flatten(-2)
        return self.gate.to(out.dtype) * self.o(out)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)


def causal_mask(query_positions: torch.Tensor, key_count: int) -> torch.Tensor:
    """``[..., M, key_count]``: query at position p sees keys at positions ≤ p."""
    return torch.arange(key_count, device=query_positions.device) <= query_positions.unsqueeze(-1)


class Composition(nn.Module):
    """All connections of one calm memory, in the order they are applied."""

    def __init__(self, spec: CompositionSpec):
        super().__init__()
        self.spec = spec
        self.connections = nn.ModuleList(Connection(spec) for _ in spec.connections)

    def at_base_layer(self, layer: int) -> list[int]:
        """Indices of the connections that add into the base's stream after ``layer``."""
        return [i for i, (_, b) in enumerate(self.spec.connections) if b == layer]

    def save(self, path: str | Path) -> None:
        """Write ``composition.safetensors`` atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, spec: CompositionSpec, name: str) -> "Composition":
        """Read and check a composition: every tensor present, of the card's shape, floating point, finite."""
        try:
            weights = load_file(str(path))
        except Exception as e:  # safetensors raises several types for bad files
            raise ArtifactError(name, "unreadable composition", f"{Path(path).name}: {e}") from None
        check_composition_tensors(name, spec, {key: (t.shape, t.dtype) for key, t in weights.items()})
        for key, t in weights.items():
            if not torch.isfinite(t).all():
                raise ArtifactError(name, "composition weights are not finite", f"{key} has NaN or infinite values")
        comp = cls(spec)
        comp.load_state_dict(weights)
        return comp

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_layers(name: str, spec: CompositionSpec, augment_layers: int, base_layers: int) -> None:
    """Every connection names a layer each model has."""
    for a, b in spec.connections:
        if not (0 <= a < augment_layers and 0 <= b < base_layers):
            raise ArtifactError(name, "connection outside the models", f"[{a}, {b}]: augment has {augment_layers} layers, base has {base_layers}")

