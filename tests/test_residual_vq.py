"""Residual VQ: stage s quantises what stages < s left; prior and samples over S codes."""
from __future__ import annotations

import pytest
import torch

from memvae.quantizers import bottleneck_class
from memvae.config.schema import load_config
from memvae.networks.pixelcnn import GatedPixelCNN
from memvae.prior.codes import extract_codes, nll_bits
from memvae.prior.fit import PriorOptions, train_prior
from memvae.prior.sample import sample_images
from memvae.training.runs import load_run
from memvae.training.train import train
from tests.conftest import CONFIGS

K, D, S = 16, 8, 3
# Bits per index the prior must beat after 200 updates: 4.80 measured (seeded, one thread);
# an untrained one scores 6.01 and the slot frequencies alone (unigram) 5.21 on these maps.
BOUND = 5.0


def test_codes_are_each_stages_nearest_slot_to_the_residual_by_brute_force():
    rvq = bottleneck_class("residual_vq")(K, D, stages=S, init="random").eval()
    z = torch.randn(2, D, 3, 4)
    out = rvq(z)
    assert out.codes.shape == (2, 3, 4, S) and out.codes.dtype == torch.int64
    for b in range(2):
        for y in range(3):
            for x in range(4):
                residual, total = z[b, :, y, x].clone(), torch.zeros(D)
                for s, layer in enumerate(rvq.layers):
                    best = min(range(K), key=lambda k: float(((residual - layer.memory[k]) ** 2).sum()))
                    assert out.codes[b, y, x, s] == best
                    total += layer.memory[best]
                    residual -= layer.memory[best]
                assert torch.allclose(out.quantized[b, :, y, x], total, atol=1e-6)
    assert torch.allclose(rvq.decode_codes(out.codes), out.quantized, atol=1e-6)


def test_sequences_and_gradient_reach_z():
    rvq = bottleneck_class("residual_vq")(K, D, stages=2).train()
    z = torch.randn(3, 10, D, requires_grad=True)
    out = rvq(z)
    assert out.quantized.shape == z.shape and out.codes.shape == (3, 10, 2)
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.slow
def test_two_stage_prior_and_samples_from_a_short_real_run(tmp_path, cifar):
    cfg = load_config(CONFIGS / "residual_vq.toml", [
        "train.steps=30", "train.threads=1", "train.log_every=10", "train.eval_every=30", "train.checkpoint_every=30",
        "data.eval_images=100", "model.hidden=32", "model.res_hidden=8", "model.res_blocks=1", "model.embedding_dim=16",
        "bottleneck.slots=64"])
    run = tmp_path / "rvq"
    train(cfg, run, data=cifar, show_progress=False)
    result = train_prior(run, PriorOptions(steps=200, width=8, layers=2, train_images=500, test_images=100, threads=1),
                         data=cifar)
    assert result["map_shape"] == [8, 16]  # each position's 2 stage codes side by side
    # The same PixelCNN untrained, on the same test maps: the bound must be one it fails.
    torch.manual_seed(0)
    model = load_run(run)[0]
    codes = extract_codes(model, cifar.test[:100])
    untrained = nll_bits(GatedPixelCNN(64, 8, 2), codes)
    print(f"residual VQ prior: {result['bits_per_index']:.3f} bits per index after 200 updates, untrained "
          f"{untrained:.3f}, unigram {result['unigram_bits_per_index']:.3f}, uniform {result['uniform_bits_per_index']:.3f}")
    assert result["uniform_bits_per_index"] == 6.0
    assert untrained > result["unigram_bits_per_index"] > BOUND > result["bits_per_index"]
    images, codes = sample_images(run, 4, seed=0)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and codes.shape == (4, 8, 16)
