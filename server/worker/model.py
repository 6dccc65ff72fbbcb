"""memserve's model: vLLM's own model of the base, with each row's memories applied inside it.

vLLM runs one forward for a whole batch, then ``compute_logits`` on some of
its output rows. So that memories reach exactly the rows whose request
selected them, and vLLM's sampler, sampling parameters, returned logprobs and
prompt logprobs all see the result with no patch of vLLM, the served model is
vLLM's own class for the base's architecture (registered under
``server.engine.keys.MODEL_ARCHITECTURES`` by the ``vllm.general_plugins``
entry point and selected with ``hf_overrides``), extended here:

- ``forward`` finds each memory row's tokens in this step (``spans``, from the
  bookkeeping in ``server/worker/rows.py``); calm rows' augmenting models read
  them and the base's layers receive their deltas through a forward hook on
  each decoder layer (``calm_step.py``); every decoder memory reads them too,
  after the base, in the model's memory slots (``bank.py``: weights
  preallocated at start, keys and values in vLLM's paged KV cache;
  ``decoder_step.py``), so under chunked prefill, prefix caching and
  preemption it reads what the base reads.
- ``compute_logits`` must know which token each of its rows is: vLLM's V1
  runner indexes the forward's output by ``logits_indices`` for sampling and
  slices it per request for prompt logprobs, then calls ``compute_logits``
  with the result, nothing else. So a step with decoder rows returns its
  hidden states widened by one fp32 column holding each token's index in the
  step (bf16/fp16 hidden states pass through fp32 unchanged), and
  ``compute_logits`` splits it off, computes the base's logits from the exact
  hidden states and fuses the decoder rows (``DecoderStep.fuse``, which
  gathers by that column on the device: nothing is read back to the host). Every use of
  the forward's output on the V1 path (``execute_model``, ``_dummy_run``,
  ``_dummy_sampler_run``, ``_get_prompt_logprobs_dict``) indexes rows only, or
  reaches ``compute_logits``; a step without decoder rows returns vLLM's
  hidden states untouched. Speculative decoding (whose drafter reads the
  hidden states) is refused at start (``server/engine/client.py``).
- Under Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``, no V1 logits
  processors) the rows come from memserve's model state instead
  (``get_model_state_cls``, ``server/worker/v2_state.py``), as the forward's
  ``memserve_rows`` keyword; decoder memories only (calm is refused with V2 at
  start). V2's runner, too, only indexes rows of the forward's output
  (``hidden_states[input_batch.logits_indices]`` in ``sample``, slices of a
  request's tokens for prompt logprobs) before ``compute_logits``.

Base rows compute exactly what vLLM computes, bit for bit (their logits are
returned in fp32 when the step fuses other rows, which is lossless).
"""

from __future__ import annotations

import logging

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from memories.artifact import ArtifactError
from memories.runner import DecoderConfig
from server.engine.keys import MEMORY_LANES, MEMORY_LAYERS, MEMORY_SLOTS
from server.worker.bank import MemoryBank, Shard
from server.worker.calm_step import CalmStep
from server.worker.decoder_step import DecoderStep
from server.worker.rows import MemoryRows
from server.worker.spans import IDS_KWARG, ROWS_KWARG, spans

log = logging.getLogger("memserve.worker")


class MemserveModel:
    """Mixed in before a vLLM ``*ForCausalLM`` whose decoder layers return ``(hidden, residual)``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._width = vllm_config.model_config.get_hidden_size()
        self._dtype = vllm_config.model_config.dtype
        self._calm: CalmStep | None = None
        self._decoders: DecoderStep | None = None  # the last forward's: compute_logits reads it until the next one
        model = self.model
        for layer in range(model.start_layer, model.end_layer):
            model.layers[layer].register_forward_hook(self._calm_hook(layer))
        self.memory_bank = memory_bank(vllm_config, model, prefix)

    def _calm_hook(self, layer: int):
        def hook(module, args, output):
            step = self._calm
            if step is None or layer not in step.layers:
                return None
            hidden, residual = output
            return hidden, step.after_layer(layer, hidden, residual)

        return hook

    @staticmethod
    def get_model_state_cls():
        """Model Runner V2's per-request state for this model (V1 never asks): it hands ``forward`` the step's memory rows."""
        from server.worker.v2_state import MemserveModelState  # imports V2's modules, which a V1 worker never needs

        return MemserveModelState

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        memory_ids = input_ids
        if ROWS_KWARG in kwargs:  # Model Runner V2: the rows from MemserveModelState.prepare_inputs (decoder rows only)
            step = kwargs.pop(ROWS_KWARG)
            step_ids = kwargs.pop(IDS_KWARG, None)  # the step's token ids where vLLM passes only inputs_embeds
            memory_ids = input_ids if input_ids is not None else step_ids
        else:
            rows = MemoryRows.active
            # token lists only where a calm row or a step without ids (prompt embeddings) needs them
            tokens = rows is not None and (input_ids is None or any(r.calm is not None for r in rows.requests.values()))
            step = spans(rows.requests, input_ids, positions, tokens) if rows is not None else []
        self._calm = CalmStep.read(step)
        try:
            hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        finally:
            self._calm = None
        self._decoders = DecoderStep.read(step, memory_ids, positions, self.memory_bank)
        if self._decoders is None or not isinstance(hidden, torch.Tensor):
            return hidden
        return with_token_index(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if hidden_states.shape[-1] != self._width + 1:
            return super().compute_logits(hidden_states)
        hidden, tokens = split_token_index(hidden_states, self._dtype)
        logits = super().compute_logits(hidden)
        if logits is None or self._decoders is None:  # None: another tensor-parallel rank gathers the logits
            return logits
        return self._decoders.fuse(logits, tokens)


def memory_bank(vllm_config, model, prefix: str) -> MemoryBank | None:
    """The decoder memory slots ``hf_overrides`` asks for (``server/engine/keys.py``), shaped like the base; None for none."""
    hf = vllm_config.model_config.hf_config
    slots = int(getattr(hf, MEMORY_SLOTS, 0) or 0)
    if slots <= 0:
        return None
    try:
        base = DecoderConfig.from_hf("base", hf.to_dict())
    except (ArtifactError, KeyError) as e:
        log.warning("no decoder memory slots: the base's shape is not one memserve's memories run (%s)", e)
        return None
    layers = int(getattr(hf, MEMORY_LAYERS, 0) or base.layers)
    prefix = f"{prefix}.memory_bank" if prefix else "memory_bank"

    shard = Shard(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())

    def attention(i: int, heads: int, kv_heads: int) -> Attention:  # one integer in the name, vLLM's layer index: after the base's layers
        return Attention(
            heads, base.head_dim, base.head_dim**-0.5, num_kv_heads=kv_heads,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn.{base.layers + i}",
        )  # fmt: skip

    own = model.layers[model.start_layer].self_attn
    lanes = int(getattr(hf, MEMORY_LANES, 1) or 1)
    reduce = tensor_model_parallel_all_reduce if shard.world > 1 else None
    return MemoryBank(base, vllm_config.model_config.dtype, own.rotary_emb, slots, lanes, layers, own.qkv_proj.bias is not None, attention, shard, reduce)


def with_token_index(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[N, H]`` as fp32 ``[N, H + 1]``, the last column each row's index in the step."""
    index = torch.arange(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    return torch.cat([hidden.float(), index[:, None]], dim=-1)


def split_token_index(widened: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' hidden states as the model computed them (``dtype``, contiguous) and their token indices in the step (on the device)."""
    return widened[:, :-1].to(dtype).contiguous(), widened[:, -1].long()


class MemserveLlamaForCausalLM(MemserveModel, LlamaForCausalLM):
    pass


class MemserveQwen2ForCausalLM(MemserveModel, Qwen2ForCausalLM):
    pass


class MemserveMistralForCausalLM(MemserveModel, MistralForCausalLM):
    pass
