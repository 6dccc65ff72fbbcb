"""A Llama-family model run incrementally for many sequences at once, and the reading of a memory decoder's weights.

``read_weights`` reads and checks a decoder memory's artifact for every
runtime: the served model's memory slots (``server/worker/bank.py``, whose
keys and values live in vLLM's paged cache) and :class:`MemoryDecoder`.

:class:`MemoryDecoder` runs such a model beside vLLM with key/value caches of
its own: a calm memory's augmenting model (``memories/calm/runtime.py``),
read at inner layers each step, so it must cost one small forward per step for
all of its rows, not a re-run of each row's context:

* each sequence owns a slot; its keys and values live at ``pool[layer, slot, :, :len]``;
* rows that advance by one token (decoding) share one batched forward, with
  per-row positions and an attention mask over their own lengths;
* rows that advance by many tokens (a prompt, or a chunk of one) run once
  each over just those tokens.

It is deliberately independent of ``transformers`` so that the transformers
path in ``memories/reference.py`` is a genuine second implementation for the
correctness tests.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from memories.artifact import BASE_TENSORS, ArtifactError, check_floating, uses_base_embeddings


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    intermediate: int = 0  # the MLP's width (0: not given)

    @classmethod
    def from_hf(cls, name: str, cfg: dict) -> "DecoderConfig":
        if cfg.get("hidden_act", "silu") != "silu":
            raise ArtifactError(name, "unsupported activation", f"memory has {cfg['hidden_act']!r}, runtime runs 'silu'")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ArtifactError(name, "unsupported rope scaling", f"memory has {rope_type!r}, runtime runs 'default'")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            intermediate=cfg.get("intermediate_size", 0),
        )


class MemoryDecoder:
    """Weights of one memory plus the KV slot pool of the sequences running on it.

    A thin memory (``"embeddings": "base"``) runs on ``base_tensors``, the base's
    ``embed_tokens.weight`` and ``lm_head.weight`` as the engine holds them: they are
    used in place, never copied, and not counted as the memory's own.
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "memory",
        device: str | torch.device = "cpu",
        dtype=torch.float32,
        kv_budget_bytes: int | None = None,
        max_len: int = 2048,
        base_tensors: dict[str, torch.Tensor] | None = None,
        row_bytes: int = 0,
    ):
        """``row_bytes``: what each resident sequence costs outside the pool (a calm row's cross-attention
        caches), counted against ``kv_budget_bytes`` too. The pool is given back whenever no sequence runs.
        """
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.cfg, self.w, self._shared = read_weights(path, name, self.device, dtype, base_tensors)
        c = self.cfg
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        self._inv_freq = inv_freq.to(self.device)
        self._k = self._v = torch.empty(0)
        self._lengths: list[int] = []
        self._generation: list[int] = []  # changes whenever a slot changes hands: stale holders notice
        self._generations = itertools.count()
        self._last_used: list[int] = []
        self._clock = 0
        self._free: list[int] = []
        self.evictions = 0
        self.kv_budget_bytes = kv_budget_bytes or None
        self._max_len = max_len
        if kv_budget_bytes:
            # With a budget the pool holds whole sequences of up to max_len tokens,
            # so the budget is a number of resident sequences; beyond it the least
            # recently used sequence is evicted and recomputed when it next runs.
            self._max_slots = max(1, kv_budget_bytes // (self._slot_bytes(max_len) + row_bytes))
            self._initial = (min(4, self._max_slots), min(256, max_len))
        else:
            self._max_slots = None
            self._initial = (4, 256)
        self._grow(*self._initial)

    # ---- weights ---------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        """The memory's own parameters; the base's shared tensors are the base's."""
        seen = {id(t): t.numel() for t in self.w.values() if id(t) not in self._shared}
        return sum(seen.values())

    @property
    def nbytes(self) -> int:
        """Bytes this memory adds on the device: its own weights plus the KV pool as allocated now."""
        weights = {id(t): t.numel() * t.element_size() for t in self.w.values() if id(t) not in self._shared}
        return sum(weights.values()) + self.pool_bytes

    @property
    def pool_bytes(self) -> int:
        """Bytes of the KV slot pool as allocated now (it grows with running sequences, up to the budget)."""
        return 2 * self._k.numel() * self._k.element_size()

    @property
    def max_slots(self) -> int | None:
        """Sequences the budget holds at once; None without a budget."""
        return self._max_slots

    # ---- slots ----------------------------------------------------------

    def open(self, protect: set[int] = frozenset(), overflow: bool = False) -> int | None:
        """Reserve a slot for a new sequence; None when the budget is reached and every slot is in ``protect``.

        Takes, in order: a free slot; a new slot while under the budget (or past
        it, with ``overflow``); the least recently used running slot outside
        ``protect`` (its row recomputes when it next runs).
        """
        if not self._free:
            n = len(self._lengths)
            if overflow or self._max_slots is None or n < self._max_slots:
                self._grow(slots=max(n + 1, min(2 * n, self._max_slots or 2 * n)), capacity=self._k.shape[3])
            else:
                victims = [s for s in range(n) if s not in protect]
                if not victims:
                    return None
                self._evict(min(victims, key=self._last_used.__getitem__))
        slot = self._free.pop()
        self._lengths[slot] = 0
        self._last_used[slot] = self._clock
        return slot

    def close(self, slot: int) -> None:
        self._lengths[slot] = -1
        self._generation[slot] = next(self._generations)
        self._free.append(slot)
        self._shrink_if_idle()

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def generation(self, slot: int) -> int:
        return self._generation[slot]

    @property
    def running(self) -> int:
        """Slots held by sequences."""
        return len(self._lengths) - len(self._free)

    def _evict(self, slot: int) -> None:
        self.close(slot)
        self.evictions += 1

    def _shrink_if_idle(self) -> None:
        """Once no sequence runs, give back a pool that grew for a peak."""
        if self.running or (len(self._lengths), self._k.shape[3]) == self._initial:
            return
        self._k = self._v = torch.empty(0)
        self._lengths, self._generation, self._last_used, self._free = [], [], [], []
        self._grow(*self._initial)

    def _slot_bytes(self, capacity: int) -> int:
        c = self.cfg
        return 2 * c.layers * c.kv_heads * capacity * c.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def _grow(self, slots: int, capacity: int) -> None:
        c = self.cfg
        old_slots = len(self._lengths)
        shape = (c.layers, slots, c.kv_heads, capacity, c.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if old_slots:
            t = self._k.shape[3]
            k[:, :old_slots, :, :t] = self._k
            v[:, :old_slots, :, :t] = self._v
        self._k, self._v = k, v
        self._lengths += [-1] * (slots - old_slots)
        self._generation += [next(self._generations) for _ in range(slots - old_slots)]
        self._last_used += [0] * (slots - old_slots)
        self._free = [s for s in range(slots - 1, old_slots - 1, -1)] + self._free

    def _reserve(self, needed: int) -> None:
        capacity = self._k.shape[3]
        if needed > capacity:
            while capacity < needed:
                capacity *= 2
            capacity = max(needed, min(capacity, self._max_len))  # the budget counted sequences of max_len
            self._grow(slots=len(self._lengths), capacity=capacity)

    # ---- forward ---------------------------------------------------------

    @torch.inference_mode()
    def read(self, slots: list[int], tokens: list[list[int]]) -> list[torch.Tensor]:
        """Append ``tokens[i]`` to sequence ``slots[i]``; return, per row, the final hidden state at each new token ``[len(tokens[i]), H]``.

        The output head is left to the caller (:meth:`head`), so that memories
        sharing the base's head can apply it once for all their rows, and only
        at the tokens whose logits are wanted.
        Single-token rows run as one batch; longer rows (prompts) run one by one.
        Every row must bring at least one token.
        """
        if not all(tokens):
            raise ValueError("read() needs at least one new token per row")
        out: list[torch.Tensor] = [torch.empty(0)] * len(slots)
        single = [i for i, t in enumerate(tokens) if len(t) == 1]
        if single:
            hidden = self._step([slots[i] for i in single], [tokens[i] for i in single])
            for j, i in enumerate(single):
                out[i] = hidden[j]
        for i, t in enumerate(tokens):
            if len(t) > 1:
                out[i] = self._step([slots[i]], [t])[0]
        return out

    @torch.inference_mode()
    def advance_layers(self, slots: list[int], tokens: list[list[int]], layers: list[int]) -> list[torch.Tensor]:
        """Append ``tokens[i]`` to sequence ``slots[i]``; return, per row, the stream after each of ``layers`` at every new token ``[len(layers), len(tokens[i]), H]``.

        For a model read at inner layers rather than at its head (a calm
        memory's augmenting model). Batched like :meth:`read`.
        """
        if not all(tokens):
            raise ValueError("advance_layers() needs at least one new token per row")
        out: list[torch.Tensor] = [torch.empty(0)] * len(slots)
        single = [i for i, t in enumerate(tokens) if len(t) == 1]
        if single:
            taps = self._step([slots[i] for i in single], [tokens[i] for i in single], layers)
            for j, i in enumerate(single):
                out[i] = taps[:, j]
        for i, t in enumerate(tokens):
            if len(t) > 1:
                out[i] = self._step([slots[i]], [t], layers)[:, 0]
        return out

    def truncate(self, slot: int, length: int) -> None:
        """Forget a sequence's tokens from ``length`` on (vLLM recomputes them)."""
        self._lengths[slot] = min(length, self._lengths[slot])

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head; thin memories of one base share it (the same storage)."""
        return self.w["lm_head.weight"]

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32) from final hidden states."""
        return F.linear(hidden, self.head_weight).float()

    def _step(self, slots: list[int], tokens: list[list[int]], layers: list[int] | None = None) -> torch.Tensor:
        """The final hidden state at each new token ``[B, M, H]``; with ``layers``, the stream after those layers instead ``[L, B, M, H]``."""
        n_new = len(tokens[0])
        starts = [self._lengths[s] for s in slots]
        self._reserve(max(starts) + n_new)
        taps: dict[int, torch.Tensor] | None = None if layers is None else {}
        hidden = self._forward(self._k, self._v, slots, starts, tokens, taps)
        self._clock += 1
        for s in slots:
            self._lengths[s] += n_new
            self._last_used[s] = self._clock
        return hidden if taps is None else torch.stack([taps[i] for i in layers])

    def _forward(
        self, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: list[int], starts: list[int], tokens: list[list[int]], taps: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Final hidden states ``[B, M, H]`` of the new tokens, their keys and values written to the cache.

        ``taps``: filled with the stream after every layer ``[B, M, H]``, by layer index.
        """
        c, w = self.cfg, self.w
        n_new = len(tokens[0])
        assert n_new == 1 or len(slots) == 1
        dev = self.device
        slot_t = torch.tensor(slots, device=dev)
        start_t = torch.tensor(starts, device=dev)
        pos = start_t[:, None] + torch.arange(n_new, device=dev)[None, :]  # [B, M]
        total = max(starts) + n_new
        # query i of row b sees key j iff j <= its own position
        mask = torch.arange(total, device=dev)[None, None, :] <= pos[:, :, None]  # [B, M, T]
        mask = mask[:, None]  # [B, 1, M, T]
        cos, sin = self._rope(pos)

        x = w["embed_tokens.weight"][torch.tensor(tokens, device=dev)]  # [B, M, H]
        B = len(slots)
        for i in range(c.layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], c.rms_eps)
            q = F.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
            k = F.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
            v = F.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
            q = _apply_rope(q.view(B, n_new, c.heads, c.head_dim).transpose(1, 2), cos, sin)
            k = _apply_rope(k.view(B, n_new, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
            v = v.view(B, n_new, c.kv_heads, c.head_dim).transpose(1, 2)
            if n_new == 1:
                cache_k[i, slot_t, :, start_t] = k[:, :, 0]
                cache_v[i, slot_t, :, start_t] = v[:, :, 0]
                keys, values = cache_k[i, slot_t, :, :total], cache_v[i, slot_t, :, :total]
            else:
                s, a = slots[0], starts[0]
                cache_k[i, s, :, a:total] = k[0]
                cache_v[i, s, :, a:total] = v[0]
                keys, values = cache_k[i, s : s + 1, :, :total], cache_v[i, s : s + 1, :, :total]
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=c.heads != c.kv_heads)
            x = x + F.linear(att.transpose(1, 2).reshape(B, n_new, -1), w[p + "self_attn.o_proj.weight"])
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_eps)
            gate = F.linear(h, w[p + "mlp.gate_proj.weight"])
            x = x + F.linear(F.silu(gate) * F.linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
            if taps is not None:
                taps[i] = x
        return rms_norm(x, w["norm.weight"], c.rms_eps)

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = pos.to(torch.float64)[..., None] * self._inv_freq  # [B, M, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, M, D]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)


def read_weights(
    path: str | Path, name: str, device: torch.device, dtype: torch.dtype, base_tensors: dict[str, torch.Tensor] | None = None
) -> tuple[DecoderConfig, dict[str, torch.Tensor], set[int]]:
    """A memory decoder's config and checked weights (names without ``model.``), and the ids of the base's tensors among them.

    A thin memory (``"embeddings": "base"``) gets ``base_tensors``, the base's
    ``embed_tokens.weight`` and ``lm_head.weight`` as the engine holds them,
    used in place.
    """
    path = Path(path)
    cfg = DecoderConfig.from_hf(name, json.loads((path / "config.json").read_text()))
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for bad files
            raise ArtifactError(name, "unreadable safetensors", f"{f.name}: {e}") from None
    shared: set[int] = set()
    if uses_base_embeddings(path):
        if base_tensors is None:
            raise ArtifactError(name, "embeddings 'base' unavailable", "this engine's model exposes no whole token embedding and output head to share (another architecture, or split across tensor-parallel ranks)")
        stored = sorted(k for k in weights if k.removeprefix("model.") in BASE_TENSORS)
        if stored:
            raise ArtifactError(name, "memory.json says embeddings 'base' but the weights hold them", ", ".join(stored))
        weights |= base_tensors
        shared = {id(t) for t in base_tensors.values()}
    return cfg, _place(name, cfg, weights, shared, device, dtype), shared


def _place(name: str, c: DecoderConfig, raw: dict[str, torch.Tensor], shared: set[int], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The memory's tensors by name (without ``model.``), checked against its config and placed on ``device`` in ``dtype``."""
    raw = {k.removeprefix("model."): v for k, v in raw.items()}
    if "lm_head.weight" not in raw:
        raw["lm_head.weight"] = raw.get("embed_tokens.weight")
    q_out, kv_out = c.heads * c.head_dim, c.kv_heads * c.head_dim
    expected = {
        "embed_tokens.weight": (c.vocab_size, c.hidden),
        "norm.weight": (c.hidden,),
        "lm_head.weight": (c.vocab_size, c.hidden),
    }
    for i in range(c.layers):
        p = f"layers.{i}."
        expected |= {
            p + "input_layernorm.weight": (c.hidden,),
            p + "post_attention_layernorm.weight": (c.hidden,),
            p + "self_attn.q_proj.weight": (q_out, c.hidden),
            p + "self_attn.k_proj.weight": (kv_out, c.hidden),
            p + "self_attn.v_proj.weight": (kv_out, c.hidden),
            p + "self_attn.o_proj.weight": (c.hidden, q_out),
            p + "mlp.gate_proj.weight": (None, c.hidden),
            p + "mlp.up_proj.weight": (None, c.hidden),
            p + "mlp.down_proj.weight": (c.hidden, None),
        }
    out = {}
    placed: dict[int, torch.Tensor] = {}  # tied weights (embeddings = head) stay one tensor
    for key, shape in expected.items():
        t = raw.get(key)
        if t is None:
            raise ArtifactError(name, "weights do not match config.json", f"tensor {key} missing")
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ArtifactError(name, "weights do not match config.json", f"{key} has shape {tuple(t.shape)}, config implies {shape}")
        check_floating(name, key, t.dtype)
        if id(t) in shared:
            if (t.device, t.dtype) != (device, dtype):
                raise ArtifactError(name, "base tensors do not match the engine", f"{key} is {t.dtype} on {t.device}, the memory runs {dtype} on {device}")
            placed[id(t)] = t
        elif id(t) not in placed:
            placed[id(t)] = _finite(name, key, t.to(device=device, dtype=dtype).contiguous(), dtype)
        out[key] = placed[id(t)]
    for i in range(c.layers):  # optional attention biases (Qwen2, attention_bias=True)
        for proj in ("q_proj", "k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{proj}.bias"
            if key in raw:
                out[key] = _finite(name, key, raw[key].to(device=device, dtype=dtype), dtype)
    return out

def _finite(name: str, key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A NaN or infinite weight turns every fused row NaN: refuse it at load.

    Checked after the cast, so values beyond the engine dtype's range are caught too.
    """
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ArtifactError(name, "weights are not finite", f"{key} has {bad:,} NaN or infinite values (as {dtype})")
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (in fp32, scaled in the weight's dtype); every runtime of a memory uses this one."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

