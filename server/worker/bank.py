"""Decoder memories inside the served model: preallocated slots whose keys and values live in vLLM's paged KV cache.

A decoder memory is a small Llama-family LM run beside the base on the tokens
of the requests that select it. Its weights sit in one of ``slots``
preallocated slots (stacked tensors ``[slots, ...]``, so loading a memory
copies into a free slot between uses and no tensor is ever reallocated); its
attention runs through vLLM's own ``Attention`` layers, registered by the
model like the base's, so their keys and values live in vLLM's paged KV
cache: counted by its profiler, freed with the request, reused by its prefix
cache (memory requests carry a ``cache_salt`` of their memories' versioned
keys, so only requests of the same memories share blocks), recomputed by
vLLM after a preemption. A token only ever uses its own request's slot, so
one ``Attention`` per memory layer serves every slot.

A request may fuse several memories (a mixture): its k-th memory runs in
*lane* k, each lane a set of attention layers of its own, so a request's
memories keep separate keys and values. ``lanes`` bounds a mixture's size.

The slots' shape is fixed at start: the base's width, heads, head size,
RoPE and vocabulary, at most ``layers`` layers (default: the base's) and at
most the base's MLP width. Whole-base copies and cuts of the base fit (fewer
layers: the rest are skipped for that slot; a narrower MLP: zero-padded,
which adds exact zeros); a memory of another width is refused at load,
naming both shapes. A thin memory (``"embeddings": "base"``) runs on the
base's own embedding and head. Tokens of rows without a memory in a lane
enter its attention as zeros and their outputs are never read, so shapes
per step depend only on the step's token count and its active slots.

Under tensor parallelism each rank holds its share of every slot, split as
vLLM splits the base (:class:`Shard`): its query heads, its key/value heads
(replicated where the ranks outnumber them), its part of the MLP; the
attention output and MLP projections give partial sums that ``reduce``
(vLLM's all-reduce) adds up, once per layer for all the step's memories.
Embeddings, norms and output heads are held whole on every rank, so each
rank computes the memories' logits itself and nothing is gathered.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memories.artifact import ArtifactError
from memories.runner import DecoderConfig, read_weights, rms_norm


@dataclass(frozen=True)
class Shard:
    """This rank's share of the slots under tensor parallelism, cut as vLLM cuts the base's layers."""

    rank: int = 0
    world: int = 1

    def part(self, n: int) -> slice:
        """This rank's equal part of ``n`` (query heads, MLP channels)."""
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def kv_heads(self, n: int) -> slice:
        """This rank's key/value heads: a part of them, or one replicated where the ranks outnumber them (vLLM's
        ``QKVParallelLinear``: rank r holds head ``r // (world // n)``)."""
        if n >= self.world:
            return self.part(n)
        head = self.rank // (self.world // n)
        return slice(head, head + 1)

    def heads(self, c: DecoderConfig) -> tuple[slice, slice]:
        """This rank's query heads and key/value heads of a memory of shape ``c``."""
        return self.part(c.heads), self.kv_heads(c.kv_heads)


@dataclass
class Slot:
    """The memory a slot holds: the row bookkeeping refers to it, so a slot is reused only once no row does."""

    index: int
    name: str
    layers: int
    vocab: int
    thin: bool
    eps: float
    num_parameters: int
    nbytes: int
    retired: bool = False  # unloaded: rows still on it finish, no new row takes it


@dataclass(frozen=True)
class LaneGroup:
    """The step's tokens (indices into the step) that run ``slot`` in one lane."""

    slot: Slot
    index: torch.Tensor


def describe(c: DecoderConfig) -> str:
    return f"hidden {c.hidden}, {c.heads} heads ({c.kv_heads} KV) of {c.head_dim}, MLP {c.intermediate}, vocabulary {c.vocab_size}, RoPE θ {c.rope_theta:g}"


class MemoryBank(nn.Module):
    """``slots`` memory slots of the base's shape, and ``lanes`` × ``layers`` vLLM attention layers for their keys and values."""

    def __init__(self, base: DecoderConfig, dtype: torch.dtype, rotary, slots: int, lanes: int, layers: int, qkv_bias: bool, attention, shard: Shard = Shard(), reduce=None):
        """``rotary``: the base's RoPE module (memories share its θ and head size); ``attention(i, heads, kv_heads)``:
        the i-th of the ``lanes × layers`` attention layers (vLLM's ``Attention``, see ``server/worker/model.py``)
        over this rank's query and key/value head counts; ``shard``: this rank's share; ``reduce``: the sum of a
        tensor over the ranks (needed only when ``shard.world > 1``)."""
        super().__init__()
        self.shape = base
        self.layers, self.lanes = layers, lanes
        self.rotary = rotary
        self.shard, self.reduce = shard, reduce
        c, n = base, slots
        self.heads, self.kv_heads = shard.heads(c)
        n_heads, n_kv = self.heads.stop - self.heads.start, self.kv_heads.stop - self.kv_heads.start
        q, kv = n_heads * c.head_dim, n_kv * c.head_dim
        inter = c.intermediate // shard.world
        self.q_size, self.kv_size = q, kv

        def buffer(name: str, *shape: int) -> None:
            self.register_buffer(name, torch.zeros(n, *shape, dtype=dtype), persistent=False)

        buffer("embed", c.vocab_size, c.hidden)
        buffer("head", c.vocab_size, c.hidden)
        buffer("norm", c.hidden)
        buffer("in_norm", layers, c.hidden)
        buffer("post_norm", layers, c.hidden)
        buffer("qkv", layers, q + 2 * kv, c.hidden)
        buffer("qkv_bias", layers, q + 2 * kv) if qkv_bias else setattr(self, "qkv_bias", None)
        buffer("o", layers, c.hidden, q)
        buffer("gate_up", layers, 2 * inter, c.hidden)
        buffer("down", layers, c.hidden, inter)
        self.attn = nn.ModuleList(attention(i, n_heads, n_kv) for i in range(lanes * layers))
        self.held: list[Slot | None] = [None] * slots
        self._lock = threading.Lock()
        self.base_embed = self.base_head = None  # the base's tensors, for thin memories (given at load)

    # ---- slots -------------------------------------------------------------

    def load(self, path: str, name: str, in_use, base_tensors: dict[str, torch.Tensor] | None) -> Slot:
        """Copy a memory into a free slot; ``in_use(slot)`` says whether a row still runs on a retired one.

        Runs beside the engine loop: no row refers to a free slot, so the copy
        races with nothing; the slot is published (the registry) only after it.
        ``base_tensors``: the base's embedding and head, for thin memories.
        """
        if base_tensors is not None:
            self.base_embed, self.base_head = base_tensors["embed_tokens.weight"], base_tensors["lm_head.weight"]
        device, dtype = self.embed.device, self.embed.dtype
        cfg, w, shared = read_weights(path, name, device, dtype, base_tensors)
        self._check_fits(name, cfg, w)
        with self._lock:
            index = next((i for i, s in enumerate(self.held) if s is None or (s.retired and not in_use(s))), None)
            if index is None:
                raise ArtifactError(name, "no free memory slot", f"all {len(self.held)} decoder memory slots hold memories (--decoder-slots {len(self.held)}); unload one first")
            own = {id(t): t for t in w.values() if id(t) not in shared}
            slot = Slot(index, name, cfg.layers, cfg.vocab_size, bool(shared), cfg.rms_eps, sum(t.numel() for t in own.values()), sum(t.numel() * t.element_size() for t in own.values()))
            self.held[index] = slot  # reserved: not free, not yet in the registry
        self._copy(index, cfg, w, bool(shared))
        return slot

    def _check_fits(self, name: str, cfg: DecoderConfig, w: dict) -> None:
        c = self.shape
        same = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rope_theta) == (c.hidden, c.heads, c.kv_heads, c.head_dim, c.rope_theta)
        has_bias = any(k.endswith("_proj.bias") for k in w)
        if not same or cfg.layers > self.layers or cfg.intermediate > c.intermediate or cfg.vocab_size > c.vocab_size or (has_bias and self.qkv_bias is None):
            raise ArtifactError(
                name,
                "memory does not fit the server's memory slots",
                f"memory: {describe(cfg)}, {cfg.layers} layers{', attention biases' if has_bias else ''}; "
                f"slots hold: {describe(c)}, up to {self.layers} layers{', attention biases' if self.qkv_bias is not None else ''} "
                "(the base's shape; --decoder-layers sets the depth)",
            )

    @torch.inference_mode()
    def _copy(self, s: int, cfg: DecoderConfig, w: dict[str, torch.Tensor], thin: bool) -> None:
        """The memory's weights into slot ``s``: this rank's heads and MLP part, a narrower MLP zero-padded to the slots'."""
        q, kv, d = self.q_size, self.kv_size, self.shape.head_dim
        rows = {"q": slice(self.heads.start * d, self.heads.stop * d), "k": slice(self.kv_heads.start * d, self.kv_heads.stop * d)}
        rows["v"] = rows["k"]
        mlp = self.shard.part(self.shape.intermediate)

        def padded(t: torch.Tensor, dim: int) -> torch.Tensor:  # the MLP's channels zero-padded to the slots' count; this rank's part
            missing = self.shape.intermediate - t.shape[dim]
            return F.pad(t, (0, missing) if dim == 1 else (0, 0, 0, missing)).narrow(dim, mlp.start, mlp.stop - mlp.start)

        for t in (self.embed, self.head, self.norm, self.in_norm, self.post_norm, self.qkv, self.o, self.gate_up, self.down):
            t[s].zero_()
        if self.qkv_bias is not None:
            self.qkv_bias[s].zero_()
        if not thin:
            self.embed[s, : cfg.vocab_size] = w["embed_tokens.weight"]
            self.head[s, : cfg.vocab_size] = w["lm_head.weight"]
        self.norm[s] = w["norm.weight"]
        for j in range(cfg.layers):
            p = f"layers.{j}."
            self.in_norm[s, j] = w[p + "input_layernorm.weight"]
            self.post_norm[s, j] = w[p + "post_attention_layernorm.weight"]
            self.qkv[s, j] = torch.cat([w[p + f"self_attn.{x}_proj.weight"][rows[x]] for x in "qkv"])
            if self.qkv_bias is not None:
                for x, (a, b) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                    if p + f"self_attn.{x}_proj.bias" in w:
                        self.qkv_bias[s, j, a:b] = w[p + f"self_attn.{x}_proj.bias"][rows[x]]
            self.o[s, j] = w[p + "self_attn.o_proj.weight"][:, rows["q"]]
            self.gate_up[s, j] = torch.cat([padded(w[p + "mlp.gate_proj.weight"], 0), padded(w[p + "mlp.up_proj.weight"], 0)])
            self.down[s, j] = padded(w[p + "mlp.down_proj.weight"], 1)

    # ---- forward -----------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lanes: list[list[LaneGroup]]) -> torch.Tensor:
        """The memories' final hidden states ``[lanes, T, H]`` at the step's tokens (at the tokens of each lane's groups; the rest unused).

        A lane without rows this step is skipped: no row reads its keys and values.
        """
        out = [self._lane(k, input_ids, positions, groups) if groups else None for k, groups in enumerate(lanes)]
        blank = self.embed.new_zeros(positions.shape[0], self.shape.hidden)
        return torch.stack([x if x is not None else blank for x in out])

    def _lane(self, lane: int, ids: torch.Tensor, positions: torch.Tensor, groups: list[LaneGroup]) -> torch.Tensor:
        T, c = ids.shape[0], self.shape
        x = self.embed.new_zeros(T, c.hidden)
        for g in groups:
            table = self.base_embed if g.slot.thin else self.embed[g.slot.index]
            x[g.index] = F.embedding(ids[g.index], table)
        for j in range(self.layers):
            running = [g for g in groups if j < g.slot.layers]
            if not running:  # deeper than every memory in this lane: no row ever reads this layer's keys and values
                break
            q = x.new_zeros(T, self.q_size)
            k, v = x.new_zeros(T, self.kv_size), x.new_zeros(T, self.kv_size)
            for g in running:
                s = g.slot.index
                h = rms_norm(x[g.index], self.in_norm[s, j], g.slot.eps)
                qkv = F.linear(h, self.qkv[s, j], None if self.qkv_bias is None else self.qkv_bias[s, j])
                qs, ks, vs = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                qs, ks = self.rotary(positions[g.index], qs.contiguous(), ks.contiguous())
                q[g.index], k[g.index], v[g.index] = qs, ks, vs
            out = self.attn[lane * self.layers + j](q, k, v)
            x = self._add(x, running, lambda g: F.linear(out[g.index], self.o[g.slot.index, j]))

            def mlp(g: LaneGroup) -> torch.Tensor:
                s, i = g.slot.index, g.index
                gate, up = F.linear(rms_norm(x[i], self.post_norm[s, j], g.slot.eps), self.gate_up[s, j]).chunk(2, dim=-1)
                return F.linear(F.silu(gate) * up, self.down[s, j])

            x = self._add(x, running, mlp)
        for g in groups:
            x[g.index] = rms_norm(x[g.index], self.norm[g.slot.index], g.slot.eps)
        return x

    def _add(self, x: torch.Tensor, groups: list[LaneGroup], project) -> torch.Tensor:
        """``x`` plus ``project(g)`` at each group's tokens (groups hold disjoint tokens). Under tensor parallelism each
        projection is a partial sum over this rank's heads or MLP channels: they are written into one zero buffer and
        summed over the ranks once for all the groups. On one device ``x`` is updated in place, without the buffer."""
        if self.shard.world == 1:
            for g in groups:
                x[g.index] += project(g)
            return x
        partial = torch.zeros_like(x)
        for g in groups:
            partial[g.index] = project(g)
        return x + self.reduce(partial)

    def head_weight(self, slot: Slot) -> torch.Tensor:
        """The slot's output head over its own vocabulary (thin memories: the base's, one tensor for all of them)."""
        return self.base_head[: slot.vocab] if slot.thin else self.head[slot.index, : slot.vocab]

