"""Index backpropagation quantisation, IBQ (Shi et al. 2024): a one-hot read whose gradient is
that of the softmax over every code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memvae.quantizers import functional as Fn
from memvae.quantizers.base import Bottleneck, BottleneckOutput, Options


@dataclass
class IBQOptions(Options):
    kind: str = "ibq"
    slots: int = 512  # K
    entropy_penalty: float = 0.05  # weight of (per-sample − codebook) entropy of softmax(z·C / τ)
    entropy_temperature: float = 0.01  # τ of that softmax (not of the read)

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots", "entropy_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("entropy_penalty",)


class IBQ(Bottleneck):
    """Argmax of the dot products z·C_k in the forward pass, the softmax's gradient backward.

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W (or
    B×N), loss as below. (Shi et al. 2024, "Taming scalable visual tokenizer for
    autoregressive image generation", sec. 3.)

        l_nk = z_n · C_k,   s_n = softmax(l_n),   h_n = one_hot(argmax_k l_nk)
        ind_n = h_n − sg(s_n) + s_n                 (value h_n, gradient that of s_n)
        z_q,n = ind_n C    (= C_argmax in the forward pass; the decoder receives z_q)
        ẑ_n = h_n C        (the hard read alone)
        loss  ‖z_q − z‖² + ‖sg(ẑ) − z‖² + 0.25‖ẑ − sg(z)‖²          (double quantisation loss)
              + λ (per-sample − codebook entropy of softmax(l / τ))  (entropy penalty, λ = 0.05, τ = 0.01)

    Every code gets a gradient at every step through s (the paper's answer to codebook
    collapse), and the encoder's gradient runs through the softmax, not straight through:
    the estimator of this project's ``memory_l2_st``, on dot products instead of β-scaled
    negative squared distances. The loss weights are those of the authors' released code
    and configs (SEED-Voken, ``IndexPropagationQuantize`` with β = 0.25, which weights the
    codebook term; ``use_entropy_loss`` with weight 0.05, temperature 0.01, per-sample and
    codebook entropies weighted 1 each); codes start N(0, 1), nn.Embedding's default, as
    there. The entropy penalty is a training term only (as in the authors' code).

    The forward value is C_argmax exactly: the soft read's graph enters as s C − sg(s C),
    which is 0 in value, so :meth:`decode_codes` of the codes gives the training read.

    Args:
        codebook_size: K.
        dim: D.
        entropy_penalty: λ, weight of the entropy penalty (0: none).
        entropy_temperature: τ of the entropy penalty's softmax.
    """

    Options = IBQOptions
    COMMITMENT = 1.0  # weight of ‖sg(ẑ) − z‖² in the authors' code
    CODEBOOK = 0.25  # their β, on ‖ẑ − sg(z)‖²

    def __init__(self, codebook_size: int, dim: int, entropy_penalty: float = 0.05, entropy_temperature: float = 0.01):
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"IBQ needs at least one code, got codebook_size = {codebook_size}")
        if entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {entropy_temperature}")
        self.codebook_size, self.dim = codebook_size, dim
        self.entropy_penalty, self.entropy_temperature = entropy_penalty, entropy_temperature
        self.memory = nn.Parameter(torch.randn(codebook_size, dim))

    @classmethod
    def from_config(cls, b, dim: int) -> "IBQ":
        return cls(b.slots, dim, entropy_penalty=b.entropy_penalty, entropy_temperature=b.entropy_temperature)

    @property
    def collective(self) -> bool:
        """Under torch.distributed the entropy penalty averages over the global batch."""
        return self.entropy_penalty > 0

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or B×N, weights None)."""
        x = Fn.flatten_positions(z)
        codebook = self.memory
        logits = x @ codebook.t()  # N×K
        idx = logits.detach().argmax(1)
        # index_select's backward adds rows in index order (repeatable on any thread count).
        hard = codebook.index_select(0, idx)
        # (h − sg(s) + s) C has the value h C and, to C, the gradient hᵀg of h C plus the
        # gradient through s; s sg(C) − sg(s C) adds exactly the latter and 0 to the value.
        soft = logits.softmax(1) @ codebook.detach()
        read = hard + (soft - soft.detach())
        loss = (Fn.mean_squared_error(read, x) + self.COMMITMENT * Fn.mean_squared_error(x, hard.detach())
                + self.CODEBOOK * Fn.mean_squared_error(hard, x.detach()))
        if self.training and self.entropy_penalty > 0:
            per_sample, spread = Fn.code_entropies(logits, 1.0 / self.entropy_temperature)
            loss = loss + self.entropy_penalty * (per_sample - spread)
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(read, z),
            loss=loss,
            codes=idx.view(Fn.position_shape(z)),
            metrics={"perplexity": Fn.perplexity_from_counts(Fn.code_counts(idx, self.codebook_size)).detach()},
        )
