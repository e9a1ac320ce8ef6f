"""The maths every bottleneck shares (memvae.quantizers.functional), each against a hand
computation or a brute force: the straight-through estimator, the moving-average write,
nearest slots and their distances, assignment statistics and perplexity."""
from __future__ import annotations

import pytest
import torch

from memvae.quantizers import functional as Fn


def test_straight_through_forwards_the_target_and_passes_the_upstream_gradient_to_z_alone():
    """Value: the target to the bit. Gradient: the upstream one, unchanged, to z, and none
    to the target (sg(target)): a codebook read through it is trained by its own loss only."""
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    out = Fn.straight_through(z, target)
    assert torch.equal(out, target.detach())
    upstream = torch.randn(6, 4, dtype=torch.float64)
    (out * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert target.grad is None or not target.grad.any(), "the target got the upstream gradient: it is not detached"


def test_ema_write_matches_the_equations_by_hand():
    """Two slots of one dimension (and a third never chosen), γ = 0.9, a large ε = 0.1 so that
    the Laplace smoothing shows: n ← γn + (1−γ)c, s ← γs + (1−γ)Σx, m = s / ñ with
    ñ = (n + ε)/(Σn + Kε)·Σn."""
    memory = torch.tensor([[1.0], [2.0], [5.0]])
    cluster_size = torch.tensor([2.0, 1.0, 0.5])
    embed_sum = torch.tensor([[2.0], [2.0], [2.5]])
    counts, sums = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([[6.0], [4.0], [0.0]])
    Fn.ema_write(memory, cluster_size, embed_sum, counts, sums, decay=0.9, eps=0.1)
    n = [0.9 * 2 + 0.1 * 3, 0.9 * 1 + 0.1 * 1, 0.9 * 0.5]
    s = [0.9 * 2 + 0.1 * 6, 0.9 * 2 + 0.1 * 4, 0.9 * 2.5]
    total = sum(n)
    smoothed = [(v + 0.1) / (total + 3 * 0.1) * total for v in n]
    assert cluster_size.tolist() == pytest.approx(n, rel=1e-6)
    assert embed_sum[:, 0].tolist() == pytest.approx(s, rel=1e-6)
    assert memory[:, 0].tolist() == pytest.approx([a / b for a, b in zip(s, smoothed)], rel=1e-6)


@pytest.mark.parametrize("max_elements", [7, 1 << 22])
def test_nearest_slots_and_their_squared_distances_by_brute_force(max_elements):
    """In chunks of a few rows or in one: the argmin and ‖x − m‖² itself (not up to ‖x‖²)."""
    gen = torch.Generator().manual_seed(0)
    x, memory = torch.randn(23, 5, generator=gen) * 3, torch.randn(9, 5, generator=gen)
    idx, dist = Fn.nearest_distances(x, memory, max_elements)
    full = ((x[:, None, :] - memory[None]) ** 2).sum(-1)
    assert torch.equal(idx, full.argmin(1))
    assert torch.allclose(dist, full.min(1).values, rtol=1e-5, atol=1e-5)
    assert torch.equal(Fn.nearest_slots(x, memory, max_elements), idx)


def test_assignment_sums_and_code_counts_by_brute_force():
    codes = torch.tensor([2, 0, 2, 2, 3])
    x = torch.arange(10.0).view(5, 2)
    counts, sums = Fn.assignment_sums(codes, x, 4)
    assert counts.tolist() == [1.0, 0.0, 3.0, 1.0]
    assert sums.tolist() == [[2.0, 3.0], [0.0, 0.0], [0 + 4 + 6.0, 1 + 5 + 7.0], [8.0, 9.0]]
    assert Fn.code_counts(codes.view(1, 5), 4).tolist() == [1, 0, 3, 1]


def test_perplexity_is_exp_of_the_entropy_in_nats():
    """Counts 1, 1, 2 (and an unused slot): p = ¼, ¼, ½, entropy 1.5 bits, perplexity 2^1.5."""
    assert float(Fn.perplexity_from_counts(torch.tensor([1, 1, 2, 0]))) == pytest.approx(2 ** 1.5, rel=1e-6)
    assert float(Fn.perplexity_from_counts(torch.tensor([0, 7, 0]))) == pytest.approx(1.0)
    assert float(Fn.perplexity_from_counts(torch.ones(64))) == pytest.approx(64.0, rel=1e-5)


def test_rotation_trick_forwards_the_target_exactly():
    """The value is the target to the bit, whatever the rotation's rounding."""
    z, target = torch.randn(8, 3), torch.randn(8, 3)
    assert torch.equal(Fn.rotation_trick(z.requires_grad_(), target), target)
