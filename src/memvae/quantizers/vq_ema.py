"""VQ-VAE's nearest-neighbour read with a codebook kept as a moving average."""
from __future__ import annotations

import torch

from memvae.quantizers import functional as Fn
from dataclasses import dataclass
from typing import ClassVar

from memvae.quantizers.base import Bottleneck, BottleneckOutput
from memvae.quantizers.vq import VQOptions


@dataclass
class VQEMAOptions(VQOptions):
    kind: str = "vq_ema"
    decay: float = 0.99  # γ of the moving averages
    reseed_fraction: float = 0.0  # re-seed slots whose moving-average count is below this fraction of N/K

    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("commitment", "reseed_fraction")
    OPEN_UNIT: ClassVar[tuple[str, ...]] = ("decay",)


class VectorQuantizerEMA(Bottleneck):
    """Nearest-slot read whose slots are exponential moving averages (VQ-VAE, app. A.1).

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W (or
    B×N), loss commitment·‖z − sg(M_i*)‖² (the only loss).

    The read is that of :class:`~memvae.quantizers.vq.VectorQuantizer`; the memory is
    a buffer, not a parameter, updated by :func:`~memvae.quantizers.functional.ema_write`
    with hard assignments (counts and sums by ``index_add_``: no N×K
    one-hot), in training mode only. With ``reseed_fraction`` > 0, after each write the
    slots whose moving-average count fell below that fraction of the mean count N/K take
    recent encoder vectors far from every slot (:func:`~memvae.quantizers.functional.reseed_dead_slots`).

    Args:
        codebook_size: K.
        dim: D.
        commitment: weight of the commitment term.
        decay: γ of the moving averages (0.99).
        eps: Laplace smoothing of the counts.
        init: "data" (default) or "random" (N(0, 1), as in Sonnet). Either way the moving
            averages start consistent with the slots (each counted once), so an unchosen
            slot stays put. Random slots still collapse, for lack of use rather than scale:
            N(0, 1) slots in D = 64 have norms near 8, the encoder's outputs about 2, so
            every output is nearest to the few slots of smallest norm and the rest are never
            written. Measured on CIFAR-10 (`memvae train --config vq_ema --bottleneck.init
            random --steps 300`, whole test set): 3 slots used of 512, perplexity 2.78,
            NMSE 0.359, largest slot norm 10.0 (no blow-up) against a mean encoder-output
            norm of 2.15; "data" reached NMSE 0.18 after 300 updates. Re-seeding
            (``reseed_fraction``) or "data" is the cure.
        reseed_fraction: a slot is dead and re-seeded when its moving-average count
            (vectors per batch) is below this fraction of N/K, the mean count of a batch of
            N positions; 0 = never. 0.25 at N = 2,048 (batch 32, 8×8) and K = 512 is a
            count of 1, vector-quantize-pytorch's usual ``threshold_ema_dead_code``.
    """

    Options = VQEMAOptions
    collective = True  # moving averages and re-seeding are summed / drawn over ranks

    def __init__(
        self, codebook_size: int, dim: int, commitment: float = 0.25, decay: float = 0.99, eps: float = 1e-5,
        init: str = "data", reseed_fraction: float = 0.0,
    ):
        super().__init__()
        if reseed_fraction < 0:
            raise ValueError(f"reseed_fraction must be >= 0, got {reseed_fraction}")
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment, self.decay, self.eps, self.reseed_fraction = commitment, decay, eps, reseed_fraction
        self._register_moving_averages(torch.randn(codebook_size, dim))
        self._setup_init(init)

    @classmethod
    def from_config(cls, b, dim: int) -> "VectorQuantizerEMA":
        return cls(b.slots, dim, commitment=b.commitment, decay=b.decay, reseed_fraction=b.reseed_fraction,
                   init=b.init)

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or
        B×N, weights None); writes the slots in training mode."""
        x = Fn.flatten_positions(z)
        self._init_from_data(x, Fn.positions_per_item(z))
        idx, distances = Fn.nearest_distances(x, self.memory)
        chosen = self.memory[idx].clone()  # the read uses the slots before this batch's write
        if self.training:
            counts, sums = Fn.assignment_sums(idx, x, self.codebook_size)
            Fn.ema_write(self.memory, self.cluster_size, self.embed_sum, counts, sums, self.decay, self.eps)
            if self.reseed_fraction > 0:
                Fn.reseed_dead_slots(self.memory, self.cluster_size, self.embed_sum, x, distances,
                                     Fn.dead_count(self.reseed_fraction, x.shape[0], self.codebook_size, x.device),
                                     Fn.positions_per_item(z))
        quantized = Fn.unflatten_positions(Fn.straight_through(x, chosen), z)
        perplexity = Fn.perplexity_from_counts(Fn.code_counts(idx, self.codebook_size))
        return BottleneckOutput(
            quantized=quantized,
            loss=self.commitment * Fn.mean_squared_error(x, chosen),
            codes=idx.view(Fn.position_shape(z)),
            metrics={"perplexity": perplexity.detach()},
        )
