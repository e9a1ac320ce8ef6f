"""Maths shared by every bottleneck, so that all are computed and measured alike."""
from __future__ import annotations

import math

import torch


def flatten_positions(z: torch.Tensor) -> torch.Tensor:
    """B×D×H×W -> (B·H·W)×D, one row per read position."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_positions(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B·H·W)×D -> B×D×H×W, the inverse of :func:`flatten_positions` for ``like``'s shape."""
    b, d, h, w = like.shape
    return flat.reshape(b, h, w, d).permute(0, 3, 1, 2)


def nearest_slots(x: torch.Tensor, memory: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """argmin_k ‖x_n − m_k‖² -> N int64, in chunks of queries so N×K never sits in memory."""
    with torch.no_grad():
        m2 = memory.pow(2).sum(1)
        # ‖x‖² is the same for every slot and does not change the argmin.
        return torch.cat([(m2 - 2.0 * part @ memory.t()).argmin(1) for part in x.split(chunk)])


def straight_through(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Forward value ``target`` exactly, gradient of the identity to ``z`` (VQ-VAE, eq. 3)."""
    # z − sg(z) is exactly 0, so the forward value is target to the bit (z + sg(target − z)
    # can be off by one ulp).
    return target.detach() + (z - z.detach())


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the slot-usage distribution given by K counts."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def code_counts(codes: torch.Tensor, num_slots: int) -> torch.Tensor:
    """How often each of the K slots appears among ``codes`` (any shape) -> K int64."""
    return torch.bincount(codes.reshape(-1), minlength=num_slots)


def weight_statistics(logits: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Statistics of w = softmax(logits) for N×K logits, summed over the N positions,
    and the argmax slot of each position (N int64).

    Returns sums (not means) so that callers can add them up over chunks:
    ``entropy_bits`` (Σ_n H(w_n) in bits), ``max_weight`` (Σ_n max_k w_nk),
    ``confident`` (number of positions with max weight > 0.99). Pass ``weights`` when
    the softmax is already computed: then no transcendental runs over N×K, because
    with l' = l − max_k l (so that w_top = exp(−log Z')),
        H(w) = log Z' − Σ_k w_k l'_k = −log w_top − Σ_k w_k l'_k.
    """
    with torch.no_grad():
        logits = logits.float()
        w = logits.softmax(1) if weights is None else weights.float()
        top, idx = w.max(1)
        shifted = logits - logits.gather(1, idx[:, None])
        entropy = (-top.log() - (w * shifted).sum(1)).clamp_min(0.0) / math.log(2.0)
        stats = {
            "entropy_bits": entropy.sum(),
            "max_weight": top.sum(),
            "confident": (top > 0.99).sum().float(),
        }
    return stats, idx


def ema_write(
    memory: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float = 1e-5,
) -> None:
    """Move every slot toward the mean of the vectors assigned to it, in place.

    With A the N×K assignments (one-hot rows for VQ-VAE, read weights for the soft
    write) and X the N×D vectors, the caller passes counts = Σ_i A_ik (K) and
    sums = AᵀX (K×D); then (VQ-VAE paper, appendix A.1; Sonnet's VectorQuantizerEMA):

        n_k ← γ n_k + (1−γ) Σ_i A_ik              (cluster_size)
        s_k ← γ s_k + (1−γ) Σ_i A_ik x_i          (embed_sum)
        ñ_k = (n_k + ε) / (Σ_j n_j + K ε) · Σ_j n_j   (Laplace smoothing: unused slots
                                                     never divide by zero)
        m_k ← s_k / ñ_k

    Under torch.distributed the batch statistics are summed over ranks first, so every
    rank keeps the same memory.
    """
    with torch.no_grad():
        counts, sums = counts.float(), sums.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = cluster_size.sum()
        smoothed = (cluster_size + eps) / (total + memory.shape[0] * eps) * total
        memory.copy_(embed_sum / smoothed.unsqueeze(1))
