"""A trained run's codes as the prior sees them: the slot map of every image
(:func:`extract_codes`), the prior's vocabulary for codes of several kinds of symbol
(:func:`symbol_ranges`), the way back to the bottleneck's own codes (:func:`codes_from_map`),
and their cost in bits per index under a prior (:func:`nll_bits`) or under the slot
frequencies alone (:func:`unigram_bits`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memvae.data import to_input
from memvae.networks.autoencoder import Autoencoder
from memvae.networks.pixelcnn import GatedPixelCNN


def bits(nats: float) -> float:
    """Nats -> bits."""
    return nats / math.log(2.0)


@torch.no_grad()
def extract_codes(model: Autoencoder, images: torch.Tensor, batch_size: int = 500, device: str | torch.device = "cpu") -> torch.Tensor:
    """The slot map of every image: uint8 N×3×H×W -> int64 N×h×w (on the CPU); for S stages
    of codes per position (residual VQ, N×h×w×S) an N×h×(w·S) map, each position's stages
    side by side, so that the PixelCNN's raster order reads stage s of a position after its
    stages < s and after every earlier position (:func:`stages_from_map` undoes it).

    A code whose symbols take different values (a mixture's k slot indices in [0, K) and its
    grid index in [0, C)) is written in the prior's vocabulary (:func:`symbol_ranges`):
    symbol s of a position shifted to its own range; :func:`codes_from_map` undoes both.

    The model runs in eval mode, so a memory model reads with its evaluation read; its
    codes are the argmax weights either way. The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        maps = [model(to_input(batch.to(device))).bottleneck.codes.cpu() for batch in images.split(batch_size)]
    finally:
        model.train(was_training)
    codes = torch.cat(maps)
    ranges = symbol_ranges(model.bottleneck)
    if ranges is not None:
        codes = codes + torch.tensor([first for first, _ in ranges])
    return codes.flatten(2) if codes.dim() == 4 else codes


def symbol_ranges(bottleneck) -> list[tuple[int, int]] | None:
    """The prior's vocabulary for a bottleneck's codes: None when every symbol of a position
    takes the same K values (one code, or residual VQ's stages: the vocabulary is K), else
    (first, size) per symbol of a position, each symbol its own range of the vocabulary
    Σ sizes, in order (a mixture: k ranges of K slot indices, then one of C grid indices).
    The PixelCNN gives each column only its symbol's range, so its NLL is the cost of the
    codes themselves, with no mass on values a symbol cannot take."""
    sizes = bottleneck.symbol_sizes()
    if len(set(sizes)) == 1:
        return None
    firsts = [sum(sizes[:s]) for s in range(len(sizes))]
    return list(zip(firsts, sizes))


def vocabulary(bottleneck) -> int:
    """The number of values a prior over ``bottleneck``'s codes models (see :func:`symbol_ranges`)."""
    ranges = symbol_ranges(bottleneck)
    return bottleneck.codebook_size if ranges is None else sum(size for _, size in ranges)


def stages_from_map(codes: torch.Tensor, stages: int) -> torch.Tensor:
    """N×h×(w·S) -> N×h×w×S, the inverse of :func:`extract_codes`' layout (S = 1: unchanged)."""
    return codes if stages == 1 else codes.view(codes.shape[0], codes.shape[1], -1, stages)


def codes_from_map(codes: torch.Tensor, bottleneck) -> torch.Tensor:
    """A map in the prior's vocabulary (:func:`extract_codes`) -> the bottleneck's own codes,
    N×h×w or N×h×w×S, ready for its ``decode_codes``."""
    codes = stages_from_map(codes, bottleneck.stages)
    ranges = symbol_ranges(bottleneck)
    if ranges is not None:
        codes = codes - torch.tensor([first for first, _ in ranges], device=codes.device)
    return codes


@torch.no_grad()
def nll_bits(prior: GatedPixelCNN, codes: torch.Tensor, batch_size: int = 500, device: str | torch.device = "cpu") -> float:
    """Mean negative log2-likelihood per index of N×h×w codes under ``prior`` (float64 sum)."""
    prior.eval()
    total, count = 0.0, 0
    for batch in codes.split(batch_size):
        batch = batch.to(device)
        total += float(F.cross_entropy(prior(batch), batch, reduction="sum").double())
        count += batch.numel()
    return bits(total / count)


def unigram_bits(train_codes: torch.Tensor, test_codes: torch.Tensor, num_slots: int,
                 ranges: list[tuple[int, int]] | None = None) -> float:
    """Bits per index of the test codes under the training codes' slot frequencies
    (add-one smoothed): the baseline a prior that models context must beat. With
    ``ranges`` (:func:`symbol_ranges`) each kind of symbol (column j mod S) has its own
    frequencies over its own range."""
    if ranges is None:
        counts = torch.bincount(train_codes.reshape(-1), minlength=num_slots).double() + 1.0
        logp = (counts / counts.sum()).log()
        return bits(float(-logp[test_codes.reshape(-1)].mean()))
    total, count = 0.0, 0
    for kind, (first, size) in enumerate(ranges):
        train_s = train_codes[..., kind::len(ranges)].reshape(-1) - first
        test_s = test_codes[..., kind::len(ranges)].reshape(-1) - first
        counts = torch.bincount(train_s, minlength=size).double() + 1.0
        total += float(-(counts / counts.sum()).log()[test_s].sum())
        count += test_s.numel()
    return bits(total / count)
