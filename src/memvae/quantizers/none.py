"""No bottleneck: the encoder's output goes to the decoder unchanged (the continuous control)."""
from __future__ import annotations

import math

import torch

from dataclasses import dataclass

from memvae.quantizers.base import Bottleneck, BottleneckOutput, Options


@dataclass
class NoneOptions(Options):
    kind: str = "none"  # and no other key: there is nothing to set


class NoBottleneck(Bottleneck):
    """z (B×D×H×W or B×N×D) -> BottleneckOutput with quantized = z itself, loss 0, no codes.

    The same encoder and decoder with nothing between them: the reconstruction error
    every bottleneck is measured against (its ceiling), and the fair comparison for a
    soft read, which is continuous too. It has no slots (``codebook_size`` = 0), no codes
    (``codes`` is None) and no prior.
    """

    reads = ("continuous",)
    discrete = False

    Options = NoneOptions

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.codebook_size, self.dim = 0, dim  # no slots; dim None: any width
        self.register_buffer("memory", torch.zeros(0, dim or 0))

    @classmethod
    def from_config(cls, b, dim: int) -> "NoBottleneck":
        return cls(dim=dim)

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        return BottleneckOutput(quantized=z, loss=z.new_zeros((), dtype=torch.float32), codes=None)

    @property
    def bits_per_position(self) -> float:
        """No codes, so no finite rate: the decoder receives z's floats themselves."""
        return math.inf

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise ValueError("the continuous control (kind 'none') has no codes to decode")
