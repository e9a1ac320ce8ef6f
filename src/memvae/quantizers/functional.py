"""Maths shared by every bottleneck, so that all are computed and measured alike."""
from __future__ import annotations

import math

import torch


def check_input(z: torch.Tensor, dim: int | None) -> None:
    """One-line errors for what a bottleneck cannot read: a layout other than B×D×H×W or
    B×N×D, or a feature width D other than ``dim`` (None: any)."""
    if z.dim() not in (3, 4):
        raise ValueError(f"a bottleneck reads B×D×H×W maps or B×N×D sequences, got shape {tuple(z.shape)}")
    width = z.shape[2] if z.dim() == 3 else z.shape[1]
    if dim is not None and width != dim:
        layout = "B×N×D sequence" if z.dim() == 3 else "B×D×H×W map"
        raise ValueError(f"this bottleneck reads vectors of width D = {dim}; the {layout} of shape {tuple(z.shape)} has D = {width}")


def flatten_positions(z: torch.Tensor) -> torch.Tensor:
    """B×D×H×W maps or B×N×D sequences -> (B·H·W or B·N)×D, one row per read position."""
    check_input(z, None)
    if z.dim() == 3:
        return z.reshape(-1, z.shape[2])
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_positions(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(positions)×D -> ``like``'s layout (B×D×H×W or B×N×D): the inverse of :func:`flatten_positions`."""
    if like.dim() == 3:
        return flat.reshape(like.shape[0], like.shape[1], flat.shape[1])
    b, _, h, w = like.shape
    return flat.reshape(b, h, w, flat.shape[1]).permute(0, 3, 1, 2)


def position_shape(z: torch.Tensor) -> tuple[int, ...]:
    """The shape of one code per position: B×H×W for maps, B×N for sequences."""
    return (z.shape[0], z.shape[1]) if z.dim() == 3 else (z.shape[0], z.shape[2], z.shape[3])


def positions_per_item(z: torch.Tensor) -> int:
    """Rows of :func:`flatten_positions` per batch item: H·W, or N for sequences."""
    return z.shape[1] if z.dim() == 3 else z.shape[2] * z.shape[3]


def nearest_slots(x: torch.Tensor, memory: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
    """argmin_k ‖x_n − m_k‖² -> N int64 (see :func:`nearest_distances`)."""
    return nearest_distances(x, memory, max_elements)[0]


def nearest_distances(x: torch.Tensor, memory: torch.Tensor, max_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """For N×D queries and K×D slots: (argmin_k ‖x_n − m_k‖² as N int64, that squared distance
    as N float32). Queries go in chunks of at most ``max_elements`` distances, so the N×K
    matrix never sits in memory however large N and K are."""
    with torch.no_grad():
        x, memory = x.float(), memory.float()
        if x.shape[0] == 0:
            return x.new_zeros(0, dtype=torch.int64), x.new_zeros(0)
        m2 = memory.pow(2).sum(1)
        rows = max(1, min(max_elements // memory.shape[0], x.shape[0]))
        # One buffer for every chunk: a fresh N×K block per chunk costs its page faults, as
        # much as the product itself at K = 2,048 (measured on one core).
        buffer = x.new_empty(rows, memory.shape[0])
        idx, dist = [], []
        for part in x.split(rows):
            # ‖x‖² is the same for every slot: added after the argmin, not to the N×K matrix.
            best, arg = torch.addmm(m2, part, memory.t(), alpha=-2.0, out=buffer[: part.shape[0]]).min(1)
            idx.append(arg)
            dist.append((best + part.pow(2).sum(1)).clamp_min(0.0))
        return torch.cat(idx), torch.cat(dist)


def assignment_sums(codes: torch.Tensor, x: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard-assignment statistics without an N×K one-hot: counts (K, float32), how many of
    the N rows chose each slot, and sums (K×D, float32), the sum of the rows x (N×D) that
    chose it; equal to (A.sum(0), AᵀX) for the one-hot assignment matrix A.

    Both are added into zeros of a fixed size (``torch.bincount`` sizes its output from
    the largest code, a read from the device on a GPU); counts are sums of ones, exact in
    float32 up to 2²⁴ rows, so they equal bincount's to the bit."""
    x = x.detach().float()
    counts = torch.zeros(codebook_size, device=x.device).index_add_(0, codes, torch.ones_like(codes, dtype=torch.float32))
    sums = torch.zeros(codebook_size, x.shape[1], device=x.device).index_add_(0, codes, x)
    return counts, sums


def straight_through(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Forward value ``target`` exactly, gradient of the identity to ``z`` (VQ-VAE, eq. 3)."""
    # z − sg(z) is exactly 0, so the forward value is target to the bit (z + sg(target − z)
    # can be off by one ulp).
    return target.detach() + (z - z.detach())


def rotation_trick(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Forward value ``target`` exactly; gradient to ``z`` through the rotation and rescaling
    that carries each row of z onto its target (Fifty et al. 2024, "the rotation trick").

    Rows N×D. With e = z/‖z‖, q̂ = target/‖target‖, r = (e + q̂)/‖e + q̂‖ and
    λ = ‖target‖/‖z‖, all treated as constants, the output is λ(z − 2r(rᵀz) + 2q̂(eᵀz)):
    the Householder-style rotation R = I − 2rrᵀ + 2q̂eᵀ takes e to q̂, so its value is the
    target, and the gradient reaching z is λRᵀ applied to the decoder's gradient, instead
    of the decoder's gradient unchanged (straight-through).
    """
    eps = 1e-12
    with torch.no_grad():
        z_norm = z.norm(dim=1, keepdim=True).clamp_min(eps)
        t_norm = target.norm(dim=1, keepdim=True).clamp_min(eps)
        e, q = z / z_norm, target / t_norm
        r = e + q
        r = r / r.norm(dim=1, keepdim=True).clamp_min(eps)
        scale = t_norm / z_norm
    rotated = scale * (z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (e * z).sum(1, keepdim=True))
    return target.detach() + (rotated - rotated.detach())


def mean_squared_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean((x − y)²) as ``F.mse_loss``, and 0 for no entries (a rank with an empty batch
    still joins the others' reductions, with nothing to add)."""
    return torch.nn.functional.mse_loss(x, y) if x.numel() else x.new_zeros(())


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the slot-usage distribution given by K counts."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def code_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each of the K slots appears among ``codes`` (any shape) -> K int64, added into
    K zeros (no output size read from the data, unlike ``torch.bincount``)."""
    flat = codes.reshape(-1)
    return torch.zeros(codebook_size, dtype=torch.int64, device=codes.device).index_add_(0, flat, torch.ones_like(flat))


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


def distributed() -> bool:
    """Whether torch.distributed runs (a process group is initialised)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rows(x: torch.Tensor, positions: int = 1) -> torch.Tensor:
    """N×... rows of this rank -> the rows of every rank, in the order one process holding the
    whole batch sees them (x itself without torch.distributed).

    ``positions`` is the number of rows per image (H·W). The engine gives rank r the images
    r, r + world, ... of a batch, so equal shares are interleaved image by image; shares of
    different sizes (a rank with no rows, a mask) are concatenated rank by rank. The ranks'
    row counts are exchanged first: one small collective and, on a GPU, one host read.
    """
    if not distributed():
        return x
    world = torch.distributed.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    shares = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(shares, padded.contiguous())
    if len(set(sizes)) == 1 and most % positions == 0:
        # world×(images per rank)×positions×... -> images in their global order
        stacked = torch.stack(shares).view(world, most // positions, positions, *x.shape[1:])
        return stacked.transpose(0, 1).reshape(-1, *x.shape[1:])
    return torch.cat([share[:size] for share, size in zip(shares, sizes)])


def same_on_every_rank(t: torch.Tensor) -> torch.Tensor:
    """``t`` with rank 0's values on every rank (in place under torch.distributed): a random
    draw made from the same gathered rows then agrees even where the ranks' generators do not."""
    if distributed():
        torch.distributed.broadcast(t, 0)
    return t


def dead_count(fraction: float, positions: int, codebook_size: int, device: torch.device | str = "cpu") -> float | torch.Tensor:
    """The moving-average count below which a slot is dead: ``fraction`` of the mean count
    per slot, N/K, for a batch of N = ``positions`` and K slots. A plain float on one
    process (no host read); under torch.distributed, whose counts are summed, N is summed
    over the ranks (their shares may differ, or be empty): a device scalar, still unread."""
    if distributed():
        total = torch.tensor(float(positions), device=device)
        torch.distributed.all_reduce(total)
        return fraction * total / codebook_size
    return fraction * positions / codebook_size


@torch.no_grad()
def reseed_dead_slots(
    memory: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    x: torch.Tensor,
    distances: torch.Tensor,
    threshold: float | torch.Tensor,
    positions: int = 1,
) -> None:
    """Give every slot whose moving-average count is below ``threshold`` a recent encoder
    vector, in place (dead-code re-seeding, as vector-quantize-pytorch's
    ``threshold_ema_dead_code``, with k-means++'s choice of vectors).

    x: N×D recent encoder outputs; distances: N, each one's squared distance to its
    nearest slot; ``positions``: rows per image (H·W). Replacements are drawn with
    probability ∝ distance, so vectors that no slot covers are the likeliest. A re-seeded
    slot counts ``threshold`` vectors (its moving average starts at the vector itself).
    Candidates are drawn for all K slots and kept only where a slot is dead: no host
    synchronisation, and the random stream does not depend on how many slots died. Under
    torch.distributed the draw is made from the global batch (:func:`global_rows`) and
    rank 0's is kept by every rank: the slots that one process on the whole batch would
    re-seed.
    """
    rows = global_rows(torch.cat([x.detach().float(), distances.detach().float().unsqueeze(1)], 1), positions)
    if rows.shape[0] == 0:
        return  # no vector anywhere to re-seed from
    weights = rows[:, -1].clamp_min(0.0) + 1e-12
    rows = same_on_every_rank(rows[torch.multinomial(weights, memory.shape[0], replacement=True), :-1].contiguous())
    dead = (cluster_size < threshold).unsqueeze(1)
    memory.copy_(torch.where(dead, rows, memory))
    embed_sum.copy_(torch.where(dead, rows * threshold, embed_sum))
    count = threshold.expand_as(cluster_size) if torch.is_tensor(threshold) else torch.full_like(cluster_size, threshold)
    cluster_size.copy_(torch.where(dead[:, 0], count, cluster_size))


class _SumOverRanks(torch.autograd.Function):
    """all_reduce (sum) with its gradient: the backward pass sums the ranks' gradients too
    (every rank's loss reads the global sum, so each rank's rows feed every rank's loss)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class _RowEntropies(torch.autograd.Function):
    """logits N×K, scale -> (Σ_n p_n (K), Σ_n H(p_n)), p_n = softmax(scale · logits_n), with a
    backward written out: the autograd graph of the formula keeps about ten N×K
    intermediates, this two (p and log p). For one row, with upstream gradients g (K) of
    Σ p and γ of Σ H:

        ∂/∂l_j [g·p + γ H(p)] = scale · p_j (t_j − Σ_k p_k t_k),   t = g − γ (log p + H)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Each row's shifted logits floored at -87 (e^-87 ≈ 1.6e-38, float32's smallest normal):
        # a sharp softmax (τ = 0.01) puts most of them thousands below the row's largest, where
        # exp leaves its vectorised path (8× slower on CPU) for a 0 or a denormal; the floor
        # moves no probability by more than 1.6e-38.
        log_p = (logits - logits.amax(1, keepdim=True)).mul_(scale).clamp_min_(-87.0)
        p = log_p.exp()
        total = p.sum(1, keepdim=True)
        p.div_(total)
        log_p.sub_(total.log())
        entropy = -torch.einsum("nk,nk->n", p, log_p)
        ctx.save_for_backward(p, log_p, entropy)
        ctx.scale = scale
        return p.sum(0), entropy.sum()

    @staticmethod
    def backward(ctx, grad_p_sum: torch.Tensor, grad_entropy: torch.Tensor):
        p, log_p, entropy = ctx.saved_tensors
        t = (log_p + entropy.unsqueeze(1)).mul_(-ctx.scale * grad_entropy).add_(ctx.scale * grad_p_sum)
        t.sub_(torch.einsum("nk,nk->n", p, t).unsqueeze(1)).mul_(p)
        return t, None


def code_entropies(logits: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two entropies of the entropy penalty that keeps every code in use (MAGVIT-v2's
    lookup-free quantisation, Yu et al. 2023, sec. 3.1, after Jansen et al. 2020; IBQ and
    BSQ use it too), in nats, for N×K logits over K codes and their ``scale`` (1/τ, the
    inverse temperature). With p_n = softmax(scale · logits_n):

        per-sample   (1/N) Σ_n H(p_n)         (minimised: each position sure of one code)
        codebook     H((1/N) Σ_n p_n)         (maximised: the batch spread over every code)

    The penalty is per-sample − codebook. Under torch.distributed both averages run over the
    global batch: the sums are all-reduced with their gradient (one collective), so that
    DDP's averaging of the ranks' gradients gives one process's; a rank with no rows adds
    nothing.
    """
    p_sum, sample_sum = _RowEntropies.apply(logits.float(), float(scale))
    n = float(logits.shape[0])
    if distributed():
        packed = _SumOverRanks.apply(torch.cat([p_sum, sample_sum.reshape(1), torch.full((1,), n, device=p_sum.device)]))
        p_sum, sample_sum, n = packed[:-2], packed[-2], packed[-1].clamp_min(1.0)
    else:
        n = max(n, 1.0)
    p_mean = p_sum / n
    # p log p → 0 as p → 0; the clamp keeps log finite where a probability underflows to 0.
    codebook = -(p_mean * p_mean.clamp_min(torch.finfo(torch.float32).tiny).log()).sum()
    return sample_sum / n, codebook
