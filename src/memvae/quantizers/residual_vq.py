"""Residual VQ (SoundStream, Zeghidour et al. 2021; EnCodec): S nearest-slot reads, each of
what the stages before it left."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memvae.quantizers import functional as Fn
from memvae.quantizers.base import Bottleneck, BottleneckOutput
from memvae.quantizers.vq_ema import VectorQuantizerEMA, VQEMAOptions


@dataclass
class ResidualVQOptions(VQEMAOptions):
    kind: str = "residual_vq"
    stages: int = 2  # S, slots (K each) per stage

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots", "stages")


class ResidualVQ(Bottleneck):
    """S stages of moving-average VQ, stage s quantising the residual of stages < s.

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W×S (or
    B×N×S, one index in [0, K) per stage), loss the sum of the stages' commitment terms.

        r_0 = z,   i_s = argmin_k ‖r_s − M^s_k‖²,   r_{s+1} = r_s − M^s_{i_s}
        output z + sg(Σ_s M^s_{i_s} − z)            (one straight-through for the sum)

    Each stage is a :class:`VectorQuantizerEMA` (moving-average write, data initialisation
    from its own first residuals, re-seeding by ``reseed_fraction`` of N/K), so the slots
    of a stage learn what the earlier stages miss. S·log2 K bits per position.

    Args:
        codebook_size: K, slots per stage.  dim: D.
        stages: S.
        commitment, decay, reseed_fraction, init: as for :class:`VectorQuantizerEMA`.
    """

    Options = ResidualVQOptions
    collective = True  # moving averages and re-seeding are summed / drawn over ranks

    def __init__(self, codebook_size: int, dim: int, stages: int = 2, commitment: float = 0.25, decay: float = 0.99,
                 reseed_fraction: float = 0.0, init: str = "data"):
        super().__init__()
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.codebook_size, self.dim, self.stages = codebook_size, dim, stages
        self.layers = nn.ModuleList(
            VectorQuantizerEMA(codebook_size, dim, commitment=commitment, decay=decay, init=init, reseed_fraction=reseed_fraction)
            for _ in range(stages))

    @classmethod
    def from_config(cls, b, dim: int) -> "ResidualVQ":
        return cls(b.slots, dim, stages=b.stages, commitment=b.commitment, decay=b.decay,
                   reseed_fraction=b.reseed_fraction, init=b.init)

    @property
    def codebook(self) -> torch.Tensor:
        """S×K×D: each stage's slots (a position's vector is the sum of one row per stage)."""
        return torch.stack([layer.memory for layer in self.layers])

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        x = Fn.flatten_positions(z)
        per_item = Fn.positions_per_item(z)
        residual, total = x, torch.zeros_like(x)
        loss, codes = x.new_zeros(()), []
        for layer in self.layers:
            # A B×N×D sequence: the stage's data initialisation gathers whole items under DDP.
            out = layer(residual.reshape(-1, per_item, self.dim))
            chosen = out.quantized.reshape(-1, self.dim).detach()  # the slot's value exactly
            loss = loss + out.loss
            codes.append(out.codes.reshape(-1))
            total = total + chosen
            residual = residual - chosen
        stacked = torch.stack(codes, 1)  # N×S
        offsets = torch.arange(self.stages, device=x.device) * self.codebook_size
        perplexity = Fn.perplexity_from_counts(Fn.code_counts(stacked + offsets, self.stages * self.codebook_size))
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(Fn.straight_through(x, total), z),
            loss=loss,
            codes=stacked.view(*Fn.position_shape(z), self.stages),
            metrics={"perplexity": perplexity.detach()},
        )

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """B×H×W×S (or B×N×S) stage indices -> the summed slot vectors, B×D×H×W (or B×N×D)."""
        vectors = sum(layer.memory[codes[..., s]] for s, layer in enumerate(self.layers))
        return vectors if codes.dim() == 3 else vectors.permute(0, 3, 1, 2).contiguous()
