"""The vLLM logits processor that fuses each request's memory into its next-token distribution.

A request opts in through ``SamplingParams.extra_args`` (keys in
``server/engine/keys.py``, set by the API layer, which strips any such keys a
client sends): one decoder memory (versioned key, λ, temperature), or a
mixture of several (lists of keys, λᵢ and Tᵢ). For those rows, each step,
each of the row's memory decoders advances by the tokens the row gained since
the last step (the whole prompt the first time, one token afterwards), all
rows of one memory in one batch (a mixture row holds a slot in each of its
memories' pools), and the row's logits are replaced by
``memories.fuse.fuse``'s log-distribution over the base and all its memories.
Memories that share an output head (thin memories: the base's own) apply it
once for all their rows, so a mix of them costs about what one memory costs.

Chunked prefill: vLLM samples a row whose prompt it has only partly computed
and then discards that sample. ``install_runner_hook`` hands the
processor, per batch row, how many tokens the base has computed through this
step, so the memory reads the prompt chunk by chunk alongside the base rather
than whole at the first chunk, and rows whose sample vLLM discards keep their
base logits. Without those counts (another vLLM build), the memory reads the
whole prompt at the first chunk, which gives the same tokens, only in one
long pass.

Where the fusion happens: vLLM computes the logprobs it returns *before*
logits processors run (``logprobs_mode=raw_logprobs``). So that returned
logprobs are the fused ones and ``logit_bias``, penalties, temperature, top-p
and top-k act on the fused distribution exactly as they act on a plain base,
``install_sampler_hook`` (installed when vLLM builds the processor in a
worker, never at import) makes the V1 sampler call :meth:`fuse_batch` first
thing; :meth:`apply` then has nothing left to do. Without the hook (another
vLLM build), :meth:`apply` fuses, and only the returned logprobs are the
base's.

Requires the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``; the engine
adapter sets it) and no async scheduling, so that ``output_tok_ids`` holds real
token ids when the processor runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from memories.runner import MemoryDecoder
from memories.fuse import check_weights, fuse
from server.engine.keys import read_decoder_parts
from server.worker.extension import REGISTRY, install_patches

log = logging.getLogger("memserve.fusion")

@dataclass
class _Part:
    """One memory of a request's row: its decoder slot and how far the decoder has read.

    A single-memory row has one part; a mixture row has one per decoder memory,
    each with its own slot in its own memory's pool.
    """

    decoder: MemoryDecoder
    weight: float
    temperature: float
    prompt: list[int]
    output: list[int]  # vLLM's live list: grows as the request decodes, and names the request
    slot: int | None = None
    generation: int = -1
    last_hidden: torch.Tensor | None = None  # the decoder's final hidden state after the context read so far

    def pending(self, computed: int | None = None) -> list[int]:
        """Tokens of the context that the decoder has not read yet (all of them without a slot).

        ``computed`` caps the context at what the base has computed so far (chunked prefill).
        """
        if self.slot is not None and self.decoder.generation(self.slot) != self.generation:
            self.slot = None  # evicted under the KV budget: recompute from the start
        fed = 0 if self.slot is None else self.decoder.length(self.slot)
        n = len(self.prompt)
        if fed > n + len(self.output):  # vLLM took sampled tokens back: start again
            self.decoder.close(self.slot)
            self.slot, fed = None, 0
        context = self.prompt[fed:] + list(self.output) if fed < n else list(self.output[fed - n :])
        return context if computed is None else context[: max(computed - fed, 0)]

    def partial(self, computed: int | None) -> bool:
        """vLLM discards this step's sample: the base has not computed the whole context yet."""
        return computed is not None and computed < len(self.prompt) + len(self.output)

    def attach(self, slot: int) -> None:
        self.slot, self.generation = slot, self.decoder.generation(slot)

    def park(self) -> None:
        """The row left the batch: the decoder keeps its sequence in case the request comes back.

        Less the last token, so that a return recomputes the logits this row drops.
        """
        if self.slot is not None and self.decoder.generation(self.slot) == self.generation:
            self.decoder.park(self.slot, self.output, self.decoder.length(self.slot) - 1)
        self.slot = self.last_hidden = None


@dataclass
class _Row:
    """One batch row's memories: one part (a single memory) or several (a mixture), fused in one formula."""

    parts: list[_Part]

    def park(self) -> None:
        for part in self.parts:
            part.park()


class MemoryFusionProcessor(LogitsProcessor):
    """Per-request memory fusion for vLLM's V1 logits-processor interface."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Row] = {}
        self._fused_this_step = False
        self.computed: list[int] | None = None  # per batch row, set by the hook for one step
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._side_done = torch.cuda.Event() if self._side_stream is not None else None
        install_patches()
        install_sampler_hook()
        install_runner_hook()

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        parts = read_decoder_parts(params.extra_args)  # malformed mixture lists: ValueError
        if parts is None:
            return
        for spec in parts:
            if not isinstance(spec["memory"], str):
                raise ValueError(f"memserve_memory must be a string, got {spec['memory']!r}")
            w, t = spec.get("weight"), spec.get("temperature", 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0.0 <= w <= 1.0:
                raise ValueError(f"memory weight must be a number in [0, 1], got {w!r}")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not (t > 0 and math.isfinite(t)):
                raise ValueError(f"memory temperature must be a positive number, got {t!r}")
        if len(parts) > 1:
            names = [spec["memory"] for spec in parts]
            if len(set(names)) != len(names):
                raise ValueError(f"a mixture names a memory twice: {names!r}")
            check_weights([spec["weight"] for spec in parts])

    def is_argmax_invariant(self) -> bool:
        return False

    # ---- batch bookkeeping ----------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._apply_update(batch_update)
        if self._side_stream is not None and self.rows:
            # A decoding row's step tokens are known before the base's forward:
            # start the memories now on their own stream so they overlap it;
            # fuse_batch waits for them. Rows still in their prompt wait for
            # fuse_batch, which knows how much of it the base computed this step.
            # (GPU only; untested on these CPU machines.)
            with torch.cuda.stream(self._side_stream):
                for entries in self._parts_by_decoder(None).values():
                    parts = [part for _, _, part in entries]
                    self._advance([p for p in parts if p.slot is not None and p.decoder.length(p.slot) >= len(p.prompt)])
                self._side_done.record()

    def _apply_update(self, batch_update: BatchUpdate) -> None:
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, output in batch_update.added:
            # A slot refilled without a matching "removed" still held the old row.
            self._drop(index)
            specs = read_decoder_parts(params.extra_args)
            if specs is None:
                continue
            if prompt is None:
                _warn_once("embeds", "a request with prompt embeddings and no token ids selects a memory; the base alone serves it")
                continue
            parts = []
            for spec in specs:
                decoder = REGISTRY.get(spec["memory"])
                if not isinstance(decoder, MemoryDecoder):
                    log.error("request names memory %s, which this worker has not loaded; the row goes without it", spec["memory"])
                    continue
                part = _Part(decoder, float(spec["weight"]), float(spec.get("temperature", 1.0)), list(prompt), output)
                slot = decoder.resume(output)  # a request vLLM only preempted or did not schedule comes back
                if slot is not None:
                    part.attach(slot)
                parts.append(part)
            if parts:
                self.rows[index] = _Row(parts)
        for a, b, direction in batch_update.moved:
            row_a = self.rows.pop(a, None)
            if direction == MoveDirectionality.SWAP:
                row_b = self.rows.pop(b, None)
                if row_b is not None:
                    self.rows[a] = row_b
            else:
                self._drop(b)
            if row_a is not None:
                self.rows[b] = row_a

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            row.park()

    # ---- fusion ----------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._fused_this_step:
            self._fused_this_step = False
            return logits
        return self.fuse_batch(logits, from_hook=False)

    def fuse_batch(self, logits: torch.Tensor, from_hook: bool = True) -> torch.Tensor:
        """Replace the logits of every memory row with the fused log-distribution.

        Rows the base is still prefilling advance the memory by this step's chunk and keep
        their base logits: vLLM discards their sample. Single-memory rows are fused per
        output head as their memories' logits come; a mixture row's memories may sit
        under different heads, so its parts are collected and fused once all are known.
        """
        self._fused_this_step = from_hook
        if not self.rows:
            return logits
        logits = logits.float()
        if self._side_stream is not None:
            torch.cuda.current_stream().wait_event(self._side_done)
        computed = self.computed or []
        limit = lambda i: computed[i] if i < len(computed) else None  # noqa: E731
        mixtures: dict[int, dict[int, tuple]] = {}  # mixture row → part position → (mem logits, weight, temperature)
        for by_decoder in self._groups_by_head(logits.shape[0]):
            entries = []
            for group in by_decoder:
                self._advance([part for _, _, part in group], [limit(i) for i, _, _ in group])  # no-op for parts the side stream already advanced
                entries += [(i, pos, part) for i, pos, part in group if not part.partial(limit(i))]
            if not entries:
                continue
            parts = [part for _, _, part in entries]
            mem_logits = parts[0].decoder.head(torch.stack([p.last_hidden for p in parts])).to(logits.device)
            weight = torch.tensor([[p.weight] for p in parts], device=logits.device)
            temperature = torch.tensor([[p.temperature] for p in parts], device=logits.device)
            broken = ~torch.isfinite(mem_logits).all(dim=-1, keepdim=True)
            if broken.any():  # overflow in the memory's dtype: that memory gives its share back to the base, never NaN
                for name in sorted({p.decoder.name for p, bad in zip(parts, broken[:, 0].tolist()) if bad}):
                    _warn_once(name, f"memory {name} gave non-finite logits; the base alone serves those rows")
                mem_logits, weight = mem_logits.masked_fill(broken, 0.0), weight.masked_fill(broken, 0.0)
            single = [k for k, (i, _, _) in enumerate(entries) if len(self.rows[i].parts) == 1]
            if len(single) == len(entries):
                index_t = torch.tensor([i for i, _, _ in entries], device=logits.device)
                logits[index_t] = fuse(logits[index_t], mem_logits, weight, temperature)
                continue
            if single:
                pick = torch.tensor(single, device=logits.device)
                index_t = torch.tensor([entries[k][0] for k in single], device=logits.device)
                logits[index_t] = fuse(logits[index_t], mem_logits[pick], weight[pick], temperature[pick])
            for k, (i, pos, _) in enumerate(entries):
                if len(self.rows[i].parts) > 1:
                    mixtures.setdefault(i, {})[pos] = (mem_logits[k], weight[k], temperature[k])
        self._fuse_mixtures(logits, mixtures)
        return logits

    @staticmethod
    def _fuse_mixtures(logits: torch.Tensor, mixtures: dict[int, dict[int, tuple]]) -> None:
        """One ``fuse`` call per mixture size K: part k of every such row stacked as the k-th memory."""
        by_size: dict[int, list[int]] = {}
        for i, parts in mixtures.items():
            by_size.setdefault(len(parts), []).append(i)
        for k, indices in by_size.items():
            ordered = [[mixtures[i][pos] for pos in sorted(mixtures[i])] for i in indices]
            index_t = torch.tensor(indices, device=logits.device)
            mems = [torch.stack([row[j][0] for row in ordered]) for j in range(k)]
            weights = [torch.stack([row[j][1] for row in ordered]) for j in range(k)]
            temperatures = [torch.stack([row[j][2] for row in ordered]) for j in range(k)]
            logits[index_t] = fuse(logits[index_t], mems if k > 1 else mems[0], weights if k > 1 else weights[0], temperatures if k > 1 else temperatures[0])

    def _groups_by_head(self, batch_size: int) -> list[list[list[tuple[int, int, _Part]]]]:
        """Batch rows' parts by output head (the same storage), and within a head by decoder."""
        groups: dict[tuple, list[list[tuple[int, int, _Part]]]] = {}
        for entries in self._parts_by_decoder(batch_size).values():
            head = entries[0][2].decoder.head_weight
            groups.setdefault((head.data_ptr(), tuple(head.shape), head.dtype, head.device), []).append(entries)
        return list(groups.values())

    def _parts_by_decoder(self, batch_size: int | None) -> dict[int, list[tuple[int, int, _Part]]]:
        """Every (row index, part position, part) of the batch, by decoder: each memory's rows advance in one call."""
        groups: dict[int, list[tuple[int, int, _Part]]] = {}
        for index, row in self.rows.items():
            if batch_size is None or index < batch_size:
                for pos, part in enumerate(row.parts):
                    groups.setdefault(id(part.decoder), []).append((index, pos, part))
        return groups

    @staticmethod
    def _advance(rows: list[_Part], computed: list[int | None] | None = None) -> None:
        """One decoder call for every row (part) that gained tokens; others keep their last hidden state.

        ``computed`` (per row, None where unknown) caps what each row reads at
        what the base has computed. A row with nothing new is a row whose
        previous sample was discarded, or a chunked-prefill row seen again
        without those counts: its context has not changed.
        A row the KV budget has no slot for runs its whole context uncached,
        unless vLLM discards its sample anyway.
        """
        if not rows:
            return
        decoder = rows[0].decoder
        limits = computed or [None] * len(rows)
        moving = [(row, pending, limit) for row, limit in zip(rows, limits) if (pending := row.pending(limit))]
        protect = {row.slot for row, _, _ in moving if row.slot is not None}
        for row, _, _ in moving:
            if row.slot is None and (slot := decoder.open(protect)) is not None:
                row.attach(slot)
                protect.add(slot)
        cached = [(row, pending) for row, pending, _ in moving if row.slot is not None]
        if cached:
            out = decoder.advance([row.slot for row, _ in cached], [pending for _, pending in cached])
            for (row, _), hidden in zip(cached, out):
                row.last_hidden = hidden
        for row, pending, limit in moving:
            if row.slot is None and not row.partial(limit):
                _warn_once(decoder.name + " budget", f"memory {decoder.name}: more rows in one step than its KV budget holds; the rest run uncached")
                row.last_hidden = decoder.compute(pending)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def install_sampler_hook() -> None:
    """Make the V1 sampler fuse before it computes logprobs (see module docstring)."""
    from vllm.v1.sample.sampler import Sampler

    if getattr(Sampler.forward, "_memserve", False):
        return
    original = Sampler.forward

    def forward(self, logits, sampling_metadata, *args, **kwargs):
        for proc in sampling_metadata.logitsprocs.non_argmax_invariant:
            if isinstance(proc, MemoryFusionProcessor):
                logits = proc.fuse_batch(logits)
        return original(self, logits, sampling_metadata, *args, **kwargs)

    forward._memserve = True
    Sampler.forward = forward


def install_runner_hook() -> None:
    """Hand the processor what the base computed this step (chunked prefill; module docstring).

    ``GPUModelRunner._sample`` (the CPU runner inherits it) runs when
    ``optimistic_seq_lens_cpu[:num_reqs]`` holds, per input-batch row (the
    rows logits processors index), the tokens the base has computed through
    this step; vLLM discards the sample of every row where that is less than
    the request's prompt plus output tokens. With speculative decoding those
    counts include draft tokens, so they are not passed on. Installed from the
    processor's constructor, in the engine process, where the runner module is
    loaded anyway.
    """
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return
    original_sample = getattr(GPUModelRunner, "_sample", None)
    if original_sample is None or getattr(original_sample, "_memserve", False):
        return

    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        counts = getattr(self, "optimistic_seq_lens_cpu", None)
        procs = [p for p in self.input_batch.sampling_metadata.logitsprocs.non_argmax_invariant if isinstance(p, MemoryFusionProcessor)]
        if counts is None or spec_decode_metadata is not None or not procs:
            return original_sample(self, logits, spec_decode_metadata, *args, **kwargs)
        computed = counts[: self.input_batch.num_reqs].tolist()
        for proc in procs:
            proc.computed = computed
        try:
            return original_sample(self, logits, spec_decode_metadata, *args, **kwargs)
        finally:
            for proc in procs:
                proc.computed = None

    _sample._memserve = True
    GPUModelRunner._sample = _sample
