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


# ---- mixtures: several decoder memories fused in one call -------------------------------------


def direct_mixture(base, mems, ws, ts):
    """(1 - Σλ)·p_base + Σ λ·p_mem, written plainly in probability space."""
    p = (1 - sum(ws)) * torch.softmax(base.double(), -1)
    for mem, w, t in zip(mems, ws, ts):
        p = p + w * torch.softmax(mem.double() / t, -1)
    return torch.log(p)


def _old_fuse(base_logits, mem_logits, weight, temperature=1.0):
    """The single-memory fusion as it was written before mixtures (the K = 1 call must equal it bit for bit)."""
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    mem = mem_logits[..., : min(base_logits.shape[-1], mem_logits.shape[-1])].float()
    if isinstance(temperature, torch.Tensor):
        mem = mem / temperature.to(mem)
    elif temperature != 1.0:
        mem = mem / temperature
    mem_logp = torch.log_softmax(mem, dim=-1)
    missing = base_logp.shape[-1] - mem_logp.shape[-1]
    if missing:
        mem_logp = torch.nn.functional.pad(mem_logp, (0, missing), value=-math.inf)
    w = torch.as_tensor(weight, dtype=torch.float64)
    return torch.logaddexp(base_logp + torch.log1p(-w).float(), mem_logp + torch.log(w).float())


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_single_memory_is_exactly_the_old_formula(w):
    g = torch.Generator().manual_seed(1)
    base, mem = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 40, generator=g) * 3
    assert torch.equal(fuse(base, mem, w, 0.7), _old_fuse(base, mem, w, 0.7))
    per_row = torch.tensor([[0.1], [0.5], [0.0], [1.0]])
    assert torch.equal(fuse(base, mem, per_row, torch.full((4, 1), 1.3)), _old_fuse(base, mem, per_row, torch.full((4, 1), 1.3)))


def test_mixture_of_two_matches_probability_space_formula():
    g = torch.Generator().manual_seed(2)
    base, m1, m2 = (torch.randn(3, 50, generator=g) * 3 for _ in range(3))
    out = fuse(base, [m1, m2], [0.3, 0.2], [0.8, 1.5])
    assert torch.allclose(out.double(), direct_mixture(base, [m1, m2], [0.3, 0.2], [0.8, 1.5]), atol=1e-5)
    assert torch.allclose(out.exp().sum(-1), torch.ones(3), atol=1e-5)
    # per-row weights: each row equals its own scalar call
    w1, w2 = torch.tensor([[0.3], [0.0], [0.5]]), torch.tensor([[0.2], [0.6], [0.5]])
    rows = fuse(base, [m1, m2], [w1, w2], 1.0)
    for i in range(3):
        assert torch.allclose(rows[i], fuse(base[i], [m1[i], m2[i]], [w1[i, 0].item(), w2[i, 0].item()]), atol=1e-6)


def test_mixture_weights_summing_to_one_leave_no_base_share():
    base, m1, m2 = torch.randn(2, 20), torch.randn(2, 20), torch.randn(2, 20)
    base[0, 3] = 50.0  # a token only the base likes gets nothing back from it
    out = fuse(base, [m1, m2], [0.6, 0.4])
    expected = torch.log(0.6 * torch.softmax(m1.double(), -1) + 0.4 * torch.softmax(m2.double(), -1))
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert torch.equal(fuse(base, [m1, m2], [1.0, 0.0]), torch.log_softmax(m1, -1))
    fuse(base, [m1, m2, m1], [0.1, 0.2, 0.7])  # 1.0000000000000002 in floats: rounding, accepted


def test_mixture_weights_above_one_are_refused():
    base, m1, m2 = torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match="sum to at most 1"):
        fuse(base, [m1, m2], [0.7, 0.4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fuse(base, [m1, m2], [-0.1, 0.4])
    # per-row weight tensors are not read back (on a GPU that would wait for the step): their producer
    # checks them, as the server checks each request's weights (server/worker/rows.py validate_params)
    fuse(base, [m1, m2], [torch.tensor([[0.5]]), torch.tensor([[0.5]])])


def test_mixture_of_one_equals_the_single_call_and_mix_on_a_few_tokens():
    from memories.fuse import mix

    g = torch.Generator().manual_seed(3)
    base, mem = torch.randn(2, 30, generator=g), torch.randn(2, 30, generator=g)
    assert torch.allclose(fuse(base, [mem], [0.4], [0.9]), fuse(base, mem, 0.4, 0.9), atol=1e-6)
    b, m1, m2 = (torch.log_softmax(torch.randn(5, generator=g).double(), -1) for _ in range(3))
    got = mix(b, [m1, m2], [0.25, 0.5])
    assert torch.allclose(got, torch.log(0.25 * b.exp() + 0.25 * m1.exp() + 0.5 * m2.exp()), atol=1e-12)


def test_narrower_memory_in_a_mixture_and_forbidden_tokens():
    base, m1, m2 = torch.randn(1, 12), torch.randn(1, 8), torch.randn(1, 12)
    base[0, 10] = -math.inf
    out = fuse(base, [m1, m2], [0.3, 0.3])
    assert out[0, 10].item() == -math.inf
    assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
