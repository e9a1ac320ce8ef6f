"""VQ-EMA (memvae.quantizers.vq_ema): the read, the loss and the decoder's input come from the
slots before this batch's moving-average write; the write follows the equations."""
from __future__ import annotations

import pytest
import torch

from memvae.quantizers import functional as Fn
from memvae.quantizers.vq_ema import VectorQuantizerEMA

K, D = 8, 4


def _trained_step(seed: int):
    """One training-mode forward of a VQ-EMA with random slots on a batch whose vectors sit
    near a few slots (so that the write moves the chosen slots far enough to see)."""
    gen = torch.Generator().manual_seed(seed)
    q = VectorQuantizerEMA(K, D, decay=0.5, init="random").train()
    with torch.no_grad():
        q.memory.copy_(torch.randn(K, D, generator=gen))
        q.embed_sum.copy_(q.memory * q.cluster_size[:, None])  # moving averages consistent with the slots
    before = q.memory.clone()
    z = (before[torch.randint(0, 3, (2 * 3 * 3,), generator=gen)] + 0.5 * torch.randn(18, D, generator=gen))
    z = z.view(2, 3, 3, D).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    return q, before, z, q(z)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_read_loss_and_decoder_input_use_the_slots_before_the_write(seed):
    """quantized = M_before[codes] exactly, loss = commitment·mse(z, M_before[codes]), and the
    slots did move (so a read after the write would differ)."""
    q, before, z, out = _trained_step(seed)
    x = Fn.flatten_positions(z.detach())
    codes = out.codes.reshape(-1)
    assert torch.equal(codes, ((x[:, None] - before[None]) ** 2).sum(-1).argmin(1))
    chosen = before[codes]
    assert torch.equal(Fn.flatten_positions(out.quantized.detach()), chosen)
    assert float(out.loss.detach()) == pytest.approx(q.commitment * float(((x - chosen) ** 2).mean()), rel=1e-6)
    moved = (q.memory[codes] - chosen).abs().amax()
    assert moved > 0.05, "the write did not move the chosen slots: the test would not see the order"


def test_the_write_after_the_read_follows_the_equations():
    """The slots after the batch are the moving averages of the vectors assigned to them
    (functional.ema_write with the batch's hard counts and sums), from the slots before."""
    q, before, z, out = _trained_step(3)
    x = Fn.flatten_positions(z.detach())
    codes = out.codes.reshape(-1)
    size, total = torch.ones(K), before.clone()  # "random" init counts each slot once
    counts = torch.zeros(K).index_add_(0, codes, torch.ones(len(codes)))
    sums = torch.zeros(K, D).index_add_(0, codes, x)
    size = 0.5 * size + 0.5 * counts
    total = 0.5 * total + 0.5 * sums
    n = size.sum()
    expected = total / ((size + q.eps) / (n + K * q.eps) * n)[:, None]
    assert torch.allclose(q.memory, expected, rtol=1e-5, atol=1e-6)


def test_eval_mode_reads_without_writing():
    q, _, _, _ = _trained_step(4)
    q.eval()
    frozen = q.memory.clone()
    z = torch.randn(2, D, 3, 3)
    out = q(z)
    assert torch.equal(q.memory, frozen)
    assert torch.equal(Fn.flatten_positions(out.quantized), frozen[out.codes.reshape(-1)])


def test_the_encoder_gets_the_upstream_gradient_plus_the_commitment_terms_alone():
    """z + sg(M − z): the decoder's gradient reaches z unchanged; the loss adds
    2·commitment·(z − M)/(N·D); the slots, a buffer, get none."""
    q, before, z, out = _trained_step(5)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, upstream)
    z.grad = None
    out.loss.backward()
    x, chosen = Fn.flatten_positions(z.detach()), before[out.codes.reshape(-1)]
    by_hand = 2 * q.commitment * (x - chosen) / x.numel()
    assert torch.allclose(Fn.flatten_positions(z.grad), by_hand, rtol=1e-5, atol=1e-8)
    assert not q.memory.requires_grad
