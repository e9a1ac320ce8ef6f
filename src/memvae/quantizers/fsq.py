"""Finite scalar quantisation (Mentzer et al. 2023): a fixed grid instead of a learned codebook."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from memvae.quantizers import functional as Fn
from dataclasses import dataclass
from typing import ClassVar

from memvae.quantizers.base import Bottleneck, BottleneckOutput, Options


@dataclass
class FSQOptions(Options):
    kind: str = "fsq"
    slots: int = 512  # K, the product of the levels
    levels: str = "8,8,8"  # levels per channel, separated by commas

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots",)

    def check(self) -> None:
        super().check()
        try:
            levels = [int(v) for v in self.levels.split(",")]
        except ValueError:
            levels = []
        if not levels or min(levels) < 2:
            raise ValueError(f"config key 'bottleneck.levels' must be integers >= 2 separated by commas, got {self.levels!r}")
        if math.prod(levels) != self.slots:
            raise ValueError(f"config key 'bottleneck.slots' must equal the product of bottleneck.levels "
                             f"({math.prod(levels)}) for fsq, got {self.slots}")


class FSQ(Bottleneck):
    """Project each position to c = len(levels) channels, bound and round each channel.

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W (or
    B×N), loss 0 (there is no codebook to pull toward, and nothing to collapse).

    For channel j with L_j levels (Mentzer et al. 2023, sec. 3):
        h = W_in z + b_in                                   (c channels)
        b_j = tanh(h_j + s_j)·a_j − o_j,   a_j = (L_j − 1)(1 + ε)/2,
              o_j = 1/2 if L_j is even else 0,  s_j = atanh(o_j / a_j)
        q_j = round(b_j) ∈ {−⌊L_j/2⌋, …, ⌈L_j/2⌉ − 1}   (straight-through gradient)
        output W_out (q / ⌊L_j/2⌋) + b_out                  (back to D channels)
    The code of a position is Σ_j (q_j + ⌊L_j/2⌋)·Π_{i<j} L_i: one of K = Π_j L_j. The
    default (8, 8, 8) gives K = 512, 9 bits per position, as vq and the memory at K = 512.

    Args:
        levels: L_j, the levels of each channel (K = Π_j L_j codes), e.g. (8, 8, 8).
        dim: D.
        eps: widens the bound slightly, so that the outermost levels are reached.
    """

    Options = FSQOptions

    def __init__(self, levels: tuple[int, ...], dim: int, eps: float = 1e-3):
        super().__init__()
        levels = tuple(int(v) for v in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be integers >= 2, got {levels}")
        self.dim, self.levels, self.codebook_size = dim, levels, math.prod(levels)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        half_width = torch.tensor([v // 2 for v in levels], dtype=torch.float32)
        amplitude = torch.tensor([(v - 1) * (1 + eps) / 2 for v in levels])
        offset = torch.tensor([0.5 if v % 2 == 0 else 0.0 for v in levels])
        basis = torch.tensor([math.prod(levels[:j]) for j in range(len(levels))], dtype=torch.int64)
        for name, value in (("half_width", half_width), ("amplitude", amplitude), ("offset", offset), ("basis", basis)):
            self.register_buffer(name, value, persistent=False)
        self._setup_init("random")

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """N×c -> N×c, channel j in (−⌊L_j/2⌋ − 1/2, ⌈L_j/2⌉ − 1/2), so that rounding gives L_j values."""
        shift = torch.atanh(self.offset / self.amplitude)
        return torch.tanh(h + shift) * self.amplitude - self.offset

    def grid(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any shape, int64) -> their normalised levels q / ⌊L/2⌋ (shape + (c,))."""
        levels = torch.tensor(self.levels, device=codes.device)
        digits = (codes.unsqueeze(-1) // self.basis) % levels
        return (digits - self.half_width.to(torch.int64)).float() / self.half_width

    @property
    def codebook(self) -> torch.Tensor:
        """K×D: the decoder input of every code."""
        return self.project_out(self.grid(torch.arange(self.codebook_size, device=self.basis.device)))

    @classmethod
    def from_config(cls, b, dim: int) -> "FSQ":
        return cls(levels=tuple(int(v) for v in b.levels.split(",")), dim=dim)

    # Levels per codebook size in the rate sweep (Mentzer et al. 2023 use 8,5,5,5 for 1,000 and
    # 8,8,8,6,5 for 15,360; here powers of two, so that FSQ's K equals the others').
    SWEEP_LEVELS = {64: "4,4,4", 512: "8,8,8", 4096: "8,8,8,8"}

    @classmethod
    def at_slots(cls, b, slots: int):
        if slots not in cls.SWEEP_LEVELS:
            raise ValueError(f"fsq has no levels chosen for K = {slots}; the sweep takes K in "
                             f"{', '.join(map(str, cls.SWEEP_LEVELS))} for fsq")
        return dataclasses.replace(b, slots=slots, levels=cls.SWEEP_LEVELS[slots])

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or B×N, weights None)."""
        x = Fn.flatten_positions(z)
        bounded = self.bound(self.project_in(x.float()))
        rounded = Fn.straight_through(bounded, torch.round(bounded))
        codes = ((rounded.detach() + self.half_width).long() * self.basis).sum(1)
        quantized = self.project_out(rounded / self.half_width).to(x.dtype)
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(quantized, z),
            loss=x.new_zeros(()),
            codes=codes.view(Fn.position_shape(z)),
            metrics={"perplexity": Fn.perplexity_from_counts(Fn.code_counts(codes, self.codebook_size)).detach()},
        )
