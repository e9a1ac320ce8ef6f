"""Lookup-free quantisation, LFQ (MAGVIT-v2, Yu et al. 2023), and with ``spherical`` its
binary spherical form, BSQ (Zhao et al. 2024): each of log2 K channels is a sign."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from memvae.quantizers import functional as Fn
from memvae.quantizers.base import Bottleneck, BottleneckOutput, Options


def _power_of_two(k: int) -> bool:
    return isinstance(k, int) and k >= 2 and k & (k - 1) == 0


@dataclass
class LFQOptions(Options):
    kind: str = "lfq"
    slots: int = 512  # K = 2^L codes, L signs
    spherical: bool = False  # BSQ: the L channels on the unit sphere, signs scaled by 1/√L
    commitment: float = 0.25  # weight of ‖v − sg(q)‖² (MAGVIT-v2 0.25; BSQ 0)
    entropy_penalty: float = 0.1  # weight of (per-sample − codebook) entropy of the code distribution
    entropy_temperature: float = 0.01  # τ of that distribution, softmax(2 v·c / τ) (LFQ 0.01; BSQ 1)

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots", "entropy_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("commitment", "entropy_penalty")

    def check(self) -> None:
        super().check()
        if not _power_of_two(self.slots):
            raise ValueError(f"config key 'bottleneck.slots' must be a power of two >= 2 for lfq "
                             f"(K = 2^L codes of L signs), got {self.slots}")


class LFQ(Bottleneck):
    """Project each position to L = log2 K channels and keep their signs.

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W (or
    B×N), loss as below.

    LFQ (Yu et al. 2023, "Language model beats diffusion: tokenizer is key to visual
    generation", sec. 3.1):

        v = W_in z + b_in                          (L channels)
        q_j = sign(v_j) ∈ {−1, 1}                  (straight-through gradient; sign(0) = −1)
        code = Σ_j 2^j [q_j > 0]                    (channel j is bit j)
        output W_out q + b_out                       (back to D channels)

    BSQ (``spherical``; Zhao et al. 2024, "Image and video tokenization with binary
    spherical quantization", sec. 3): v is first put on the unit sphere, u = v/‖v‖, and
    q_j = sign(u_j)/√L, so every code lies on the sphere too; the rest is as LFQ.

    Loss: commitment·‖v − sg(q)‖² (mean over channels) plus, in training, the entropy
    penalty λ·(E_n H(p_n) − H(E_n p_n)) of the distribution over all K codes
    p_n(c) = softmax_c(2 v_n·c / τ), c running over the K sign patterns (scaled as q):
    −‖v − c‖²/τ up to a term the same for every c. Each position is pushed toward one
    code, the batch toward all of them (:func:`~memvae.quantizers.functional.code_entropies`).
    The published defaults: LFQ commitment 0.25, λ = 0.1, τ = 0.01 (Open-MAGVIT2's
    released configs, after the MAGVIT-v2 paper); BSQ commitment 0, λ = 0.1, τ = 1 (the
    authors' released bsq-vit configs). Two simplifications, said here: both entropies are
    computed exactly over all K codes (an N×K softmax; BSQ's code splits the L bits into
    groups of 9 and sums the groups' codebook entropies, the same thing when L ≤ 9 and an
    upper bound above), and BSQ's schedule of λ (3λ at the start, down to λ over 2,000
    updates) is not reproduced.

    Args:
        codebook_size: K, a power of two (L = log2 K bits per position).
        dim: D.
        spherical: BSQ instead of LFQ.
        commitment, entropy_penalty, entropy_temperature: the weights and τ above.
    """

    Options = LFQOptions

    def __init__(self, codebook_size: int, dim: int, spherical: bool = False, commitment: float = 0.25,
                 entropy_penalty: float = 0.1, entropy_temperature: float = 0.01):
        super().__init__()
        if not _power_of_two(codebook_size):
            raise ValueError(f"LFQ needs a power of two >= 2 codes (K = 2^L codes of L signs), got codebook_size = {codebook_size}")
        if entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {entropy_temperature}")
        bits = codebook_size.bit_length() - 1
        self.codebook_size, self.dim, self.bits, self.spherical = codebook_size, dim, bits, spherical
        self.commitment, self.entropy_penalty, self.entropy_temperature = commitment, entropy_penalty, entropy_temperature
        self.scale = 1.0 / math.sqrt(bits) if spherical else 1.0  # |q_j|
        self.project_in = nn.Linear(dim, bits)
        self.project_out = nn.Linear(bits, dim)
        self.register_buffer("bit_values", 2 ** torch.arange(bits), persistent=False)
        # K×L: the sign pattern of every code, scaled as q (for the entropy penalty and decoding).
        self.register_buffer("patterns", self.values_of(torch.arange(codebook_size)), persistent=False)

    @classmethod
    def from_config(cls, b, dim: int) -> "LFQ":
        return cls(b.slots, dim, spherical=b.spherical, commitment=b.commitment, entropy_penalty=b.entropy_penalty,
                   entropy_temperature=b.entropy_temperature)

    @classmethod
    def at_slots(cls, b, slots: int):
        if not _power_of_two(slots):
            raise ValueError(f"lfq takes K = 2^L codes (L signs per position); K = {slots} is no power of two")
        return dataclasses.replace(b, slots=slots)

    @property
    def collective(self) -> bool:
        """Under torch.distributed the entropy penalty averages over the global batch."""
        return self.entropy_penalty > 0

    def values_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any shape, int64) -> their quantised channels q (shape + (L,)): ±1, or ±1/√L for BSQ."""
        bits = (codes.unsqueeze(-1) >> torch.arange(self.bits, device=codes.device)) & 1
        return (bits.float() * 2 - 1) * self.scale

    @property
    def codebook(self) -> torch.Tensor:
        """K×D: W_out q + b_out of every code, what the decoder receives for it."""
        return self.project_out(self.patterns)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes B×H×W -> B×D×H×W (or B×N -> B×N×D): W_out q + b_out, q read from the code's bits."""
        vectors = self.project_out(self.values_of(codes))
        return vectors if codes.dim() == 2 else vectors.permute(0, 3, 1, 2).contiguous()

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or B×N, weights None)."""
        x = Fn.flatten_positions(z)
        v = self.project_in(x)
        if self.spherical:
            v = F.normalize(v, dim=1)
        positive = v.detach() > 0
        q = (positive.float() * 2 - 1) * self.scale
        codes = (positive.long() * self.bit_values).sum(1)
        loss = self.commitment * Fn.mean_squared_error(v, q) if self.commitment > 0 else v.new_zeros(())
        if self.training and self.entropy_penalty > 0:
            # p_n(c) ∝ exp(−‖v_n − c‖²/τ) = exp((2 v_n·c − ‖v_n‖² − ‖c‖²)/τ), and ‖c‖² is the same for every c.
            per_sample, spread = Fn.code_entropies(v @ self.patterns.t(), 2.0 / self.entropy_temperature)
            loss = loss + self.entropy_penalty * (per_sample - spread)
        quantized = self.project_out(Fn.straight_through(v, q))
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(quantized, z),
            loss=loss,
            codes=codes.view(Fn.position_shape(z)),
            metrics={"perplexity": Fn.perplexity_from_counts(Fn.code_counts(codes, self.codebook_size)).detach()},
        )
