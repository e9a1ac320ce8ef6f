"""VQ-VAE's nearest-neighbour read with a codebook trained by gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memvae.quantizers import functional as Fn
from dataclasses import dataclass
from typing import ClassVar

from memvae.quantizers.base import Bottleneck, BottleneckOutput, SlotOptions


@dataclass
class VQOptions(SlotOptions):
    kind: str = "vq"
    commitment: float = 0.25  # weight of the commitment term

    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("commitment",)


class VectorQuantizer(Bottleneck):
    """Nearest-slot read (van den Oord et al. 2017, eq. 3).

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W (or
    B×N), loss as below.

    i*_n = argmin_k ‖z_n − M_k‖²; output M_i* with the straight-through gradient
    z + sg(M_i* − z); loss ‖sg(z) − M_i*‖² + commitment·‖z − sg(M_i*)‖².

    Args:
        codebook_size: K.
        dim: D, the width of z and of each slot.
        commitment: weight of the commitment term (0.25 in the paper).
        init: "data" (the default: see Bottleneck) or "random" (uniform in ±1/K, the VQ-VAE paper's).
    """

    Options = VQOptions

    def __init__(self, codebook_size: int, dim: int, commitment: float = 0.25, init: str = "data"):
        super().__init__()
        self.codebook_size, self.dim, self.commitment = codebook_size, dim, commitment
        self.memory = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size))
        self._setup_init(init)

    @classmethod
    def from_config(cls, b, dim: int) -> "VectorQuantizer":
        return cls(b.slots, dim, commitment=b.commitment, init=b.init)

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or B×N, weights None)."""
        x = Fn.flatten_positions(z)
        self._init_from_data(x, Fn.positions_per_item(z))
        idx = Fn.nearest_slots(x, self.memory)
        # index_select's backward adds rows in index order on any thread count; memory[idx]'s
        # adds them with atomics from several threads on CPU, in an order that varies.
        chosen = self.memory.index_select(0, idx)
        codebook_loss = F.mse_loss(chosen, x.detach())
        commitment_loss = F.mse_loss(x, chosen.detach())
        quantized = Fn.unflatten_positions(Fn.straight_through(x, chosen), z)
        codes = idx.view(Fn.position_shape(z))
        perplexity = Fn.perplexity_from_counts(Fn.code_counts(idx, self.codebook_size))
        return BottleneckOutput(
            quantized=quantized,
            loss=codebook_loss + self.commitment * commitment_loss,
            codes=codes,
            metrics={"perplexity": perplexity.detach()},
        )
