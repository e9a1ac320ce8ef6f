"""The simplex grid of a mixture read (:class:`memvae.quantizers.mixture.MixtureRead`): its
canonical points, the number of distinct reads it gives, and rounding weights onto it."""
from __future__ import annotations

import math

import torch


def check_shape(codebook_size: int, k: int, levels: int) -> None:
    """ValueError naming the key for a k or L no mixture of ``codebook_size`` slots can have."""
    if not 1 <= k <= codebook_size:
        raise ValueError(f"config key 'bottleneck.k' must be between 1 and the {codebook_size} slots, got {k}")
    if levels < 1:
        raise ValueError(f"config key 'bottleneck.levels' must be >= 1, got {levels}")
    if k * math.log2(levels + 1) > 62:  # a grid point's key, Σ n_j (L+1)^(k-1-j), must fit in int64
        raise ValueError(f"config key 'bottleneck.levels' = {levels} with k = {k} makes (L+1)^k exceed 2^62")


def grid_points(levels: int, k: int) -> list[tuple[int, ...]]:
    """The canonical points of the simplex grid {n/L : n_j ≥ 0 integers, Σ n_j = L} in k
    parts: the counts n sorted non-increasing (the partitions of L into at most k parts),
    in decreasing lexicographic order, so that index 0 is (L, 0, …, 0), the one-slot read."""

    def parts(total: int, slots: int, largest: int) -> list[tuple[int, ...]]:
        if slots == 0:
            return [()] if total == 0 else []
        return [(first, *rest) for first in range(min(total, largest), -1, -1)
                for rest in parts(total - first, slots - 1, first)]

    return parts(levels, k, levels)


def count_codes(codebook_size: int, k: int, levels: int) -> int:
    """The number of distinct reads Σ_j (n_j/L) M_{s_j} of at most k slots of K (for slots in
    general position): a read is a map slot -> count with m ≤ k slots of positive count summing
    to L, C(K, m) sets of slots times C(L − 1, m − 1) compositions of L into m positive parts."""
    return sum(math.comb(codebook_size, m) * math.comb(levels - 1, m - 1) for m in range(1, min(k, levels) + 1))


def round_to_grid(weights: torch.Tensor, levels: int) -> torch.Tensor:
    """The nearest point n/L of the simplex grid to each row of N×k ``weights`` on the
    simplex (Euclidean distance) -> counts N×k int64 with Σ_j n_j = L.

    Minimising Σ_j (L w_j − n_j)² over integers with Σ n_j = L: start from ⌊L w_j⌋, then the
    R = L − Σ_j ⌊L w_j⌋ missing units go to the R entries of largest fractional part f_j
    (rounding entry j up costs (1 − f_j)² − f_j² = 1 − 2 f_j more, least for the largest f_j;
    ties go to the earlier entry).
    """
    scaled = weights.float() * levels
    base = scaled.floor()
    frac = scaled - base
    missing = (levels - base.sum(1, keepdim=True)).clamp(0, weights.shape[1])
    rank = frac.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return base.long() + (rank < missing).long()
