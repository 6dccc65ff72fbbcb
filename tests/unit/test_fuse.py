import math

import pytest
import torch

from memories.fuse import fuse


def direct(base, mem, w, t=1.0):
    """The formula written plainly in probability space."""
    return torch.log((1 - w) * torch.softmax(base.double(), -1) + w * torch.softmax(mem.double() / t, -1))


@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 1.0])
def test_matches_probability_space_formula(w):
    g = torch.Generator().manual_seed(0)
    base, mem = torch.randn(3, 50, generator=g) * 3, torch.randn(3, 50, generator=g) * 3
    out = fuse(base, mem, w, 0.7)
    assert torch.allclose(out.double(), direct(base, mem, w, 0.7), atol=1e-5)
    assert torch.allclose(out.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_weight_zero_and_one_are_exact():
    base, mem = torch.randn(2, 20), torch.randn(2, 20)
    assert torch.equal(fuse(base, mem, 0.0), torch.log_softmax(base, -1))
    assert torch.equal(fuse(base, mem, 1.0), torch.log_softmax(mem, -1))


def test_stable_for_extreme_logits():
    base = torch.tensor([[1e4, -1e4, 0.0]])
    mem = torch.tensor([[-1e4, 1e4, 0.0]])
    out = fuse(base, mem, 0.5)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_per_row_weights_and_temperatures():
    base, mem = torch.randn(2, 10), torch.randn(2, 10)
    w, t = torch.tensor([[0.2], [0.9]]), torch.tensor([[1.0], [2.0]])
    out = fuse(base, mem, w, t)
    assert torch.allclose(out[0], fuse(base[0], mem[0], 0.2, 1.0), atol=1e-6)
    assert torch.allclose(out[1], fuse(base[1], mem[1], 0.9, 2.0), atol=1e-6)


def test_narrower_memory_gives_base_mass_only_beyond_its_vocab():
    base, mem = torch.randn(1, 12), torch.randn(1, 8)
    out = fuse(base, mem, 0.5)
    base_logp = torch.log_softmax(base, -1)
    assert torch.allclose(out[0, 8:], base_logp[0, 8:] + math.log(0.5), atol=1e-6)
    assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_wider_memory_is_cut_to_the_base_width():
    base, mem = torch.randn(1, 8), torch.randn(1, 12)
    out = fuse(base, mem, 0.5)
    assert out.shape == (1, 8)
    assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_tokens_the_base_forbids_stay_forbidden():
    base, mem = torch.randn(1, 6), torch.randn(1, 6)
    base[0, 2] = -math.inf
    out = fuse(base, mem, 0.7)
    assert out[0, 2].item() == -math.inf
    assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan")])
def test_weight_out_of_range_is_refused(w):
    with pytest.raises(ValueError, match="memory weight"):
        fuse(torch.randn(1, 4), torch.randn(1, 4), w)
