"""vLLM-CPU's LoRA shrink with the fix: rows without an adapter (-1) get zero, the others what vLLM computes."""

import torch

from server.lora_cpu import fix_cpu_lora_rows


def test_rows_without_an_adapter_get_no_delta():
    from vllm.lora.ops.torch_ops import bgmv_shrink as original, sgmv_shrink as original_prefill
    from vllm.lora.punica_wrapper import punica_cpu

    assert fix_cpu_lora_rows() and fix_cpu_lora_rows()  # idempotent
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
