"""No bottleneck: the encoder's output goes to the decoder unchanged (the continuous control)."""
from __future__ import annotations

import torch

from memvae.bottlenecks.base import Bottleneck, BottleneckOutput


class NoBottleneck(Bottleneck):
    """z (B×D×H×W or B×N×D) -> BottleneckOutput with quantized = z itself, loss 0, no codes.

    The same encoder and decoder with nothing between them: the reconstruction error
    every bottleneck is measured against (its ceiling), and the fair comparison for a
    soft read, which is continuous too. It has no slots (``num_slots`` = 0), no codes
    (``codes`` is None) and no prior.
    """

    reads = ("continuous",)
    discrete = False

    def __init__(self, num_slots: int = 0, dim: int = 0):
        super().__init__()
        self.num_slots, self.dim = 0, dim  # K is ignored: there are no slots
        self.register_buffer("memory", torch.zeros(0, dim))

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        if z.dim() not in (3, 4):
            raise ValueError(f"a bottleneck reads B×D×H×W maps or B×N×D sequences, got shape {tuple(z.shape)}")
        width = z.shape[2] if z.dim() == 3 else z.shape[1]
        if self.dim and width != self.dim:
            raise ValueError(f"z has feature width {width}, this bottleneck expects {self.dim}")
        return BottleneckOutput(quantized=z, loss=z.new_zeros(()), codes=None)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise ValueError("the continuous control (kind 'none') has no codes to decode")
