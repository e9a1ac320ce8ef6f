"""SimVQ (Zhu et al. 2024): a frozen random codebook moved as a whole by one learned linear map."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memvae.quantizers import functional as Fn
from memvae.quantizers.base import Bottleneck, BottleneckOutput, Options


@dataclass
class SimVQOptions(Options):
    kind: str = "simvq"
    slots: int = 512  # K
    commitment: float = 0.25  # β, weight of ‖z − sg(q)‖², as VQ-VAE's

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots",)
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("commitment",)


class SimVQ(Bottleneck):
    """Nearest-code read of the codebook C·Wᵀ + b: C frozen, the linear map learned.

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W (or
    B×N), loss as below. (Zhu et al. 2024, "Addressing representation collapse in vector
    quantized models with one linear layer", sec. 3-4.)

        Q = C Wᵀ + b                       C: K×D frozen, entries N(0, 1/D); W: D×D, b: D learned
        i*_n = argmin_k ‖z_n − Q_k‖²
        output Q_i* with the straight-through gradient z + sg(Q_i* − z)
        loss ‖sg(z) − Q_i*‖² + β‖z − sg(Q_i*)‖²     (VQ-VAE, eq. 3)

    The codebook loss reaches only W and b, and every code is Q_k = W C_k + b: a step on W
    moves all K codes at once, chosen or not, so none is left behind (the paper's remedy
    for codebook collapse: a slot VQ-VAE never chooses never moves). The map is a linear
    layer with a bias and PyTorch's default initialisation, as the authors' code has it
    (their equation writes CW; their released config uses β = 0.25 on the commitment term,
    ``legacy: false``).

    Args:
        codebook_size: K.
        dim: D, the width of z, of the basis and of each code.
        commitment: β (0.25).
    """

    Options = SimVQOptions

    def __init__(self, codebook_size: int, dim: int, commitment: float = 0.25):
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"SimVQ needs at least one code, got codebook_size = {codebook_size}")
        self.codebook_size, self.dim, self.commitment = codebook_size, dim, commitment
        # A buffer, not a parameter: no optimiser sees it, and it is saved with the model
        # (a run resumes with the same basis).
        self.register_buffer("basis", torch.randn(codebook_size, dim) / math.sqrt(dim))
        self.project = nn.Linear(dim, dim)

    @classmethod
    def from_config(cls, b, dim: int) -> "SimVQ":
        return cls(b.slots, dim, commitment=b.commitment)

    @property
    def codebook(self) -> torch.Tensor:
        """K×D: Q = C Wᵀ + b, the vector the decoder receives for each code."""
        return self.project(self.basis)

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or B×N, weights None)."""
        x = Fn.flatten_positions(z)
        codebook = self.codebook  # K×D, once per call: the K·D² product is small beside N·K·D
        idx = Fn.nearest_slots(x, codebook.detach())
        # index_select's backward adds rows in index order (repeatable on any thread count).
        chosen = codebook.index_select(0, idx)
        loss = Fn.mean_squared_error(chosen, x.detach()) + self.commitment * Fn.mean_squared_error(x, chosen.detach())
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(Fn.straight_through(x, chosen), z),
            loss=loss,
            codes=idx.view(Fn.position_shape(z)),
            metrics={"perplexity": Fn.perplexity_from_counts(Fn.code_counts(idx, self.codebook_size)).detach()},
        )
