"""VQ-VAE's nearest-neighbour read with a codebook kept as a moving average."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memvae.bottlenecks import functional as Fn
from memvae.bottlenecks.base import Bottleneck, BottleneckOutput


class VectorQuantizerEMA(Bottleneck):
    """Nearest-slot read whose slots are exponential moving averages (VQ-VAE, app. A.1).

    The read is that of :class:`~memvae.bottlenecks.vq.VectorQuantizer`; the memory is
    a buffer, not a parameter, updated by :func:`~memvae.bottlenecks.functional.ema_write`
    with one-hot assignments, in training mode only. The only loss is
    commitment·‖z − sg(M_i*)‖².

    Args:
        num_slots: K.
        dim: D.
        commitment: weight of the commitment term.
        decay: γ of the moving averages (0.99).
        eps: Laplace smoothing of the counts.
        init: "data" (default) or "random" (N(0, 1), as in Sonnet). With this project's
            encoder, whose outputs start near norm 0.6, N(0, 1) slots all lose to the one
            of smallest norm and the rest are never written: measured on CIFAR-10, 1 slot
            in use and NMSE 0.98 after 600 updates, against NMSE 0.18 with "data" after 300.
    """

    def __init__(
        self, num_slots: int, dim: int, commitment: float = 0.25, decay: float = 0.99, eps: float = 1e-5, init: str = "data"
    ):
        super().__init__()
        self.num_slots, self.dim = num_slots, dim
        self.commitment, self.decay, self.eps = commitment, decay, eps
        memory = torch.randn(num_slots, dim)
        self.register_buffer("memory", memory)
        self.register_buffer("cluster_size", torch.zeros(num_slots))
        self.register_buffer("embed_sum", memory.clone())
        self._setup_init(init)

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W -> BottleneckOutput with quantized B×D×H×W, codes B×H×W."""
        x = Fn.flatten_positions(z)
        self._init_from_data(x, z.shape[2] * z.shape[3])
        idx = Fn.nearest_slots(x, self.memory)
        chosen = self.memory[idx].clone()  # the read uses the slots before this batch's write
        if self.training:
            one_hot = F.one_hot(idx, self.num_slots).float()
            counts, sums = one_hot.sum(0), one_hot.t() @ x.detach()
            Fn.ema_write(self.memory, self.cluster_size, self.embed_sum, counts, sums, self.decay, self.eps)
        quantized = Fn.unflatten_positions(Fn.straight_through(x, chosen), z)
        perplexity = Fn.perplexity_from_counts(Fn.code_counts(idx, self.num_slots))
        return BottleneckOutput(
            quantized=quantized,
            loss=self.commitment * F.mse_loss(x, chosen),
            codes=idx.view(z.shape[0], z.shape[2], z.shape[3]),
            metrics={"perplexity": perplexity.detach()},
        )
