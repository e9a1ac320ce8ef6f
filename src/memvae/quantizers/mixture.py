"""Mixtures of k slots with weights on a simplex grid: the soft read made discrete, with a rate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from memvae.quantizers import functional as Fn
from memvae.quantizers.base import Bottleneck, BottleneckOutput, SlotOptions
# The grid's arithmetic lives beside the read; its names stay importable from here.
from memvae.quantizers.mixture_grid import check_shape, count_codes, grid_points, round_to_grid

__all__ = ["MixtureOptions", "MixtureRead", "check_shape", "count_codes", "grid_points", "round_to_grid"]

WAYS = ("topk", "pursuit")
WRITES = ("ema", "gradient")


@dataclass
class MixtureOptions(SlotOptions):
    kind: str = "mixture"
    k: int = 2  # slots mixed per position
    levels: int = 3  # L: every weight is a multiple of 1/L
    way: str = "topk"  # "topk" (the k nearest slots, softmax weights rounded) or "pursuit" (greedy search)
    write: str = "ema"  # how slots learn: "ema" (moving averages of their least-squares targets) or "gradient"
    commitment: float = 0.25  # weight of ‖z − sg(read)‖²
    beta_init: float = 1.0  # way "topk": the learned β's start (logits −β·‖z − m‖²/q̄)
    decay: float = 0.99  # γ of the moving averages (the ema write's slots, slot usage, q̄)
    reseed_fraction: float = 0.25  # re-seed slots whose usage falls below this fraction of N/K (0: never)

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots", "k", "levels", "beta_init")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("commitment", "reseed_fraction")
    OPEN_UNIT: ClassVar[tuple[str, ...]] = ("decay",)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {**SlotOptions.CHOICES, "way": WAYS, "write": WRITES}

    def check(self) -> None:
        super().check()
        check_shape(self.slots, self.k, self.levels)


class MixtureRead(Bottleneck):
    """A read of k slots with weights on the simplex grid of resolution 1/L: a discrete
    model whose code per position is k slot indices and one grid index.

    z (B×D×H×W or B×N×D) -> BottleneckOutput: quantized in z's layout, codes B×H×W×(k+1)
    (or B×N×(k+1)): k slot indices in [0, K), then a grid index in [0, C).

        read r = Σ_j (n_j / L) M_{s_j},   n_j ≥ 0 integers, Σ_j n_j = L.

    Two ways to choose (s, n), both under no gradient:

    topk (the study's read, made discrete): the k nearest slots s_1..s_k (largest
        scores −‖z − m‖²), weights w = softmax_j(−β‖z − M_{s_j}‖² / q̄) and n the nearest grid
        point to w (:func:`round_to_grid`). β = exp(log β) is learned, not annealed (at
        β → ∞ the read is the hard read); q̄ is the moving average (γ = ``decay``, training
        only) of each z's squared distance to its nearest slot, the codebook's own
        resolution, so that β = 1 means the same sharpness whatever the encoder's scale.
        β gets its gradient from the codebook term below, through w with the rounding
        passed straight (n/L + w − sg(w)), with the scores held fixed.
    pursuit (greedy search, matching pursuit on the simplex grid): s_1 is the nearest slot
        with all the mass, r_1 = M_{s_1} (the hard read). Step t = 2..k moves a ∈ {0, 1, …,
        n_1} units of weight from the anchor s_1 to a slot s of all K (the read stays a
        convex combination on the grid):
            r_t = r_{t−1} + (a/L)(M_s − M_{s_1}),   n_1 ← n_1 − a,   n_s ← n_s + a,
        choosing the (s, a) of least error ‖z − r_t‖² over all K slots and all such a (the
        error is a convex parabola in a, so per slot the best a is its vertex
        L·e·(M_s − M_{s_1})/‖M_s − M_{s_1}‖², e = z − r_{t−1}, rounded and clipped to
        [0, n_1]); a = 0 when no move lowers the error, and every later step then adds
        nothing. Cost: 2 + (k − 1) N×K×D products, chunked over positions.

    Codes are canonical: reads that are equal for slots in general position get one code.
    Counts of a slot chosen twice are added; the slots are ordered by decreasing count,
    ties by increasing index; slots of count 0 come last and are written as slot 0; the
    grid index is that of the sorted counts among the C partitions of L into at most k
    parts (:func:`grid_points`, index 0 = (L, 0, …, 0)). So no two codes decode to the
    same read, and ``code_bits`` = log2 :func:`count_codes` counts every code either way
    can emit (each is emitted for some slots and queries; which ones a trained model
    emits depends on where its slots lie, which the prior measures);
    ``bits_per_position`` = k·log2 K + log2 C(L + k − 1, k − 1) is the fixed-length bound
    of k raw slot indices and one raw grid point. The read is computed from the canonical
    code by :meth:`decode_codes`' own arithmetic, so decoding a code gives the training
    read bit for bit; k = 1 is the hard nearest-slot read.

    Training (the same read as evaluation): the decoder receives z + sg(r − z), so the
    encoder's gradient is straight-through (VQ-VAE, eq. 3), and the loss holds
    ``commitment``·‖z − sg(r)‖². Slots start from data in a config (the first batch's
    encoder outputs). How the slots learn (``write``):

    ema (the default): moving averages of each slot's least-squares target. With the
        batch's codes fixed, Σ_i ‖z_i − Σ_j w_ij M_{s_ij}‖² is least in slot s where
        Σ w² M_s = Σ w·(z − r + w M_s), the sums over the entries (i, j) that read s with
        weight w = n_ij/L > 0 (z − r + w M_s is what is left of z for s to explain). Those
        two sums are the counts and sums of :func:`~memvae.quantizers.functional.ema_write`
        (γ = ``decay``): each write moves every slot toward its target with the other slots
        of its positions held, a damped block-coordinate step whose fixed point is the
        least-squares fit of the slots to the codes. At k = 1 the target is z and the
        write is VQ-VAE's moving average (:class:`~memvae.quantizers.vq_ema.VectorQuantizerEMA`,
        equal up to rounding). Measured: with the gradient write, k = 1 (the hard read)
        reached train NMSE 0.28 at update 400 where vq_ema_reseed reached 0.096.
    gradient: M is a parameter trained by the codebook term ‖sg(z) − r‖² (its slots get
        the gradient of the read, weighted by n_j/L), as VQ-VAE's slots.

    Re-seeding (``reseed_fraction`` > 0), either write: a slot whose moving-average mass
    (Σ w² per batch for ema; Σ w per batch for gradient) falls below ``reseed_fraction``
    of the mean per slot takes an encoder output of the global batch drawn ∝ its squared
    distance to its nearest slot (k-means++), and its average restarts at that threshold
    (ema; :func:`~memvae.quantizers.functional.reseed_dead_slots`) or at the mean (gradient).

    Args:
        codebook_size: K.  dim: D.
        k: slots per position (1 ≤ k ≤ K).
        levels: L, the grid's resolution 1/L.
        way: "topk" or "pursuit".
        write: "ema" or "gradient".
        commitment, beta_init, decay, reseed_fraction: as above.
        init: "data" (the default: the first training batch's encoder outputs) or "random"
            (N(0, 1) slots). With "data", the first batch's codebook term is 0 where every
            query is a slot (N ≤ K), so the slots' first gradient can be 0.
        max_elements: at most this many N×K entries are held at once (positions are chunked).
    """

    Options = MixtureOptions
    reads = ("mixture",)
    collective = True  # q̄, usage and re-seeding are reduced or drawn over ranks
    logged_metrics = ("beta", "max_weight", "slots_per_position")
    averaged_metrics = {"max_weight": "max_weight", "slots_per_position": "slots_per_position"}

    def __init__(self, codebook_size: int, dim: int, k: int = 2, levels: int = 3, way: str = "topk", write: str = "ema",
                 commitment: float = 0.25, beta_init: float = 1.0, decay: float = 0.99, reseed_fraction: float = 0.25,
                 init: str = "data", max_elements: int = 1 << 21):
        super().__init__()
        check_shape(codebook_size, k, levels)
        if way not in WAYS:
            raise ValueError(f"way must be one of {', '.join(WAYS)}, got {way!r}")
        if write not in WRITES:
            raise ValueError(f"write must be one of {', '.join(WRITES)}, got {write!r}")
        if not (beta_init > 0 and 0 < decay < 1 and commitment >= 0 and reseed_fraction >= 0):
            raise ValueError(f"need beta_init > 0, 0 < decay < 1, commitment >= 0 and reseed_fraction >= 0; got "
                             f"{beta_init}, {decay}, {commitment}, {reseed_fraction}")
        self.codebook_size, self.dim, self.k, self.levels, self.way, self.write = codebook_size, dim, k, levels, way, write
        self.stages = k + 1  # symbols per position: k slot indices and the grid index
        self.commitment, self.decay, self.reseed_fraction = commitment, decay, reseed_fraction
        self.max_elements = max_elements
        if write == "ema":
            self._register_moving_averages(torch.randn(codebook_size, dim))
        else:
            self.memory = nn.Parameter(torch.randn(codebook_size, dim))
            self.register_buffer("usage", torch.full((codebook_size,), -1.0))  # < 0: not yet set
        if way == "topk":  # pursuit has no temperature (DDP needs every parameter used)
            self.log_beta = nn.Parameter(torch.tensor(math.log(beta_init)))
            self.register_buffer("distortion", torch.zeros(()))  # q̄; 0 until the first training batch
        points = grid_points(levels, k)
        grid = torch.tensor(points, dtype=torch.int64)
        # Not saved: they follow from k and L.
        self.register_buffer("grid", grid, persistent=False)  # C×k counts, sorted non-increasing
        self.register_buffer("grid_radix", (levels + 1) ** torch.arange(k - 1, -1, -1, dtype=torch.int64), persistent=False)
        # Grid points in decreasing key order, so their negated keys increase (searchsorted).
        self.register_buffer("grid_keys", -(grid * self.grid_radix).sum(1), persistent=False)
        self._setup_init(init)

    @classmethod
    def from_config(cls, b, dim: int) -> "MixtureRead":
        return cls(b.slots, dim, k=b.k, levels=b.levels, way=b.way, write=b.write, commitment=b.commitment, beta_init=b.beta_init,
                   decay=b.decay, reseed_fraction=b.reseed_fraction, init=b.init)

    # ------------------------------------------------------------------ the face of a quantiser
    @property
    def codebook(self) -> torch.Tensor:
        """K×D: the slots (detached)."""
        return self.memory.detach()

    @property
    def grid_size(self) -> int:
        """C: the number of canonical grid points (partitions of L into at most k parts)."""
        return self.grid.shape[0]

    @property
    def bits_per_position(self) -> float:
        """The fixed-length bound k·log2 K + log2 C(L + k − 1, k − 1)."""
        return self.k * math.log2(self.codebook_size) + math.log2(math.comb(self.levels + self.k - 1, self.k - 1))

    @property
    def code_bits(self) -> float:
        """log2 of the number of distinct canonical codes (:func:`count_codes`)."""
        return math.log2(count_codes(self.codebook_size, self.k, self.levels))

    def symbol_sizes(self) -> tuple[int, ...]:
        """The values each symbol of a position's code takes: K for each slot index, C for the grid index."""
        return (self.codebook_size,) * self.k + (self.grid_size,)

    def slot_counts(self, codes: torch.Tensor) -> torch.Tensor:
        """K int64: how many positions of ``codes`` (…×(k+1)) read each slot with a weight > 0."""
        flat = codes.reshape(-1, self.k + 1)
        read = (self.grid[flat[:, self.k]] > 0).long()
        return torch.zeros(self.codebook_size, dtype=torch.int64, device=codes.device).index_add_(
            0, flat[:, : self.k].reshape(-1), read.reshape(-1))

    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def evaluation_constants(self) -> dict[str, float]:
        numbers = {"bits_per_position": self.bits_per_position, "code_bits": self.code_bits}
        if self.way == "topk":
            numbers["beta"] = float(self.beta())
        return numbers

    # ------------------------------------------------------------------ choosing slots and weights
    def _chunk_rows(self, n: int) -> int:
        return max(1, min(self.max_elements // self.codebook_size, n))

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, memory: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest slots of each of N×D queries: (squared distances N×k, increasing;
        slots N×k int64), from ‖m‖² − 2x·m as :func:`~memvae.quantizers.functional.nearest_distances`."""
        x, memory = x.float(), memory.float()
        if x.shape[0] == 0:
            return x.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=x.device)
        m2 = memory.pow(2).sum(1)
        rows = self._chunk_rows(x.shape[0])
        buffer = x.new_empty(rows, memory.shape[0])
        dist, idx = [], []
        for part in x.split(rows):
            best, arg = torch.addmm(m2, part, memory.t(), alpha=-2.0, out=buffer[: part.shape[0]]).topk(k, 1, largest=False)
            dist.append((best + part.pow(2).sum(1, keepdim=True)).clamp_min(0.0))
            idx.append(arg)
        return torch.cat(dist), torch.cat(idx)

    @torch.no_grad()
    def pursuit(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The greedy search of the class docstring for N×D queries -> (slots N×k in the order
        chosen, counts N×k: the anchor's final count first, then the units a each step moved,
        squared distance of each query to its nearest slot N)."""
        x, memory = x.float(), memory.float()
        n, k, levels = x.shape[0], self.k, self.levels
        if n == 0:
            empty = torch.zeros(0, k, dtype=torch.int64, device=x.device)
            return empty, empty.clone(), x.new_zeros(0)
        m2 = memory.pow(2).sum(1)
        rows = self._chunk_rows(n)
        # Three N×K buffers for every chunk and step (e·(M_s − M_anchor), the units, the gain):
        # at K = 4,096 the elementwise passes, not the products, take most of the time.
        along_buf, units_buf, gain_buf = (x.new_empty(rows, memory.shape[0]) for _ in range(3))
        slots, counts, nearest = [], [], []
        for part in x.split(rows):
            r = part.shape[0]
            best, anchor = torch.addmm(m2, part, memory.t(), alpha=-2.0, out=gain_buf[:r]).min(1)
            nearest.append((best + part.pow(2).sum(1)).clamp_min(0.0))
            chosen, moved = [anchor], []
            if k > 1:
                a_vec = memory.index_select(0, anchor)
                # ‖M_s − M_anchor‖², N×K, and L/‖M_s − M_anchor‖² (0 for the anchor itself and its
                # copies): the same at every step.
                spread = torch.addmm(m2, a_vec, memory.t(), alpha=-2.0).add_(m2.index_select(0, anchor)[:, None]).clamp_min_(0.0)
                scale = torch.where(spread > 0, levels / spread.clamp_min(1e-30), torch.zeros_like(spread))
                error = part - a_vec
                left = torch.full_like(anchor, levels)
                along, alpha, gain = along_buf[:r], units_buf[:r], gain_buf[:r]
                for _ in range(k - 1):
                    torch.mm(error, memory.t(), out=along).sub_((error * a_vec).sum(1, keepdim=True))  # e·(M_s − M_anchor)
                    # The parabola's vertex in units, rounded and clipped to [0, left], as a weight a/L.
                    torch.mul(along, scale, out=alpha).round_().clamp_min_(0.0)
                    torch.minimum(alpha, left[:, None].float(), out=alpha).div_(levels)
                    # ‖e‖² − ‖e − α(M_s − M_anchor)‖² = α(2 e·(M_s − M_anchor) − α‖M_s − M_anchor‖²)
                    torch.mul(alpha, spread, out=gain).mul_(-1.0).add_(along, alpha=2.0).mul_(alpha)
                    gain.scatter_(1, anchor[:, None], 0.0)  # moving weight to the anchor itself changes nothing
                    top, slot = gain.max(1)
                    step = (alpha.gather(1, slot[:, None]).squeeze(1) * levels).round_().long()
                    step = torch.where(top > 0, step, torch.zeros_like(step))
                    error = error - (step.float() / levels)[:, None] * (memory.index_select(0, slot) - a_vec)
                    left = left - step
                    chosen.append(slot)
                    moved.append(step)
                counts.append(torch.stack([left, *moved], 1))
            else:
                counts.append(torch.full_like(anchor, levels)[:, None])
            slots.append(torch.stack(chosen, 1))
        return torch.cat(slots), torch.cat(counts), torch.cat(nearest)

    def canonical(self, slots: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Slots N×k and counts N×k (Σ = L, any order, repeats allowed) -> canonical codes
        N×(k+1) (see the class docstring)."""
        slots, counts = slots.clone(), counts.clone()
        for j in range(1, self.k):  # a slot chosen twice: its counts go to its first entry
            for i in range(j):
                moved = torch.where(slots[:, i] == slots[:, j], counts[:, j], torch.zeros_like(counts[:, j]))
                counts[:, i] += moved
                counts[:, j] -= moved
        slots = torch.where(counts > 0, slots, torch.zeros_like(slots))
        key = counts * self.codebook_size + (self.codebook_size - 1 - slots)  # larger count first, then smaller slot
        order = key.argsort(dim=1, descending=True, stable=True)
        slots, counts = slots.gather(1, order), counts.gather(1, order)
        grid = torch.searchsorted(self.grid_keys, -(counts * self.grid_radix).sum(1, keepdim=True)).squeeze(1)
        return torch.cat([slots, grid[:, None]], 1)

    def _read(self, memory: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Σ_j (n_j/L) M_{s_j} for N×(k+1) codes -> N×D, term by term in code order (the one
        arithmetic of training and decoding, so both give the same bits)."""
        weights = self.grid[codes[:, self.k]].float() / self.levels
        read = weights[:, :1] * memory.index_select(0, codes[:, 0])
        for j in range(1, self.k):
            read = read + weights[:, j:j + 1] * memory.index_select(0, codes[:, j])
        return read

    # ------------------------------------------------------------------ the forward pass
    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W×(k+1)
        or B×N×(k+1), weights None); moves q̄, the usage averages and re-seeds in training mode."""
        x = Fn.flatten_positions(z)
        positions = Fn.positions_per_item(z)
        self._init_from_data(x, positions)
        n = x.shape[0]
        memory = self.memory
        soft = soft_slots = None
        if self.way == "topk":
            distances, slots = self.nearest(x, memory.detach(), self.k)
            nearest = distances[:, 0]
            if self.training:
                self._track_distortion(nearest)
            soft_slots = slots
            soft = torch.softmax(-self.beta() * distances / self.distortion.clamp_min(1e-12), 1)  # N×k, gradient to β
            counts = round_to_grid(soft.detach(), self.levels)
        else:
            slots, counts, nearest = self.pursuit(x, memory.detach())
        codes = self.canonical(slots, counts)
        read = self._read(memory, codes)
        fit = read
        if soft is not None:  # value exactly the read; β's gradient through w, rounding passed straight
            fit = read + ((soft - soft.detach())[:, :, None] * memory.detach()[soft_slots]).sum(1)
        loss = self.commitment * Fn.mean_squared_error(x, read.detach())
        if self.write == "gradient" or soft is not None:  # the codebook term: the slots' gradient, or β's
            loss = loss + Fn.mean_squared_error(fit, x.detach())
        if self.training and self.write == "ema":
            self._ema_write(x, read, codes, nearest, positions)
        elif self.training and self.reseed_fraction > 0:
            self._reseed(x, nearest, codes, positions)
        weights = self.grid[codes[:, self.k]]
        used = (weights > 0).long()
        perplexity = Fn.perplexity_from_counts(torch.zeros(self.codebook_size, dtype=torch.int64, device=x.device).index_add_(
            0, codes[:, : self.k].reshape(-1), used.reshape(-1)))
        metrics = {
            "perplexity": perplexity.detach(),
            "max_weight": (weights[:, 0].float() / self.levels).mean() if n else x.new_zeros(()),
            "slots_per_position": used.sum(1).float().mean() if n else x.new_zeros(()),
        }
        if self.way == "topk":
            metrics["beta"] = self.beta().detach()
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(Fn.straight_through(x, read), z),
            loss=loss,
            codes=codes.view(*Fn.position_shape(z), self.k + 1),
            metrics=metrics,
        )

    @torch.no_grad()
    def _track_distortion(self, distances: torch.Tensor) -> None:
        """q̄ ← γ q̄ + (1 − γ)·(mean of ``distances`` over every rank's positions); the first batch sets it."""
        total = torch.stack([distances.sum(), distances.new_tensor(float(distances.numel()))])
        if Fn.distributed():
            torch.distributed.all_reduce(total)
        batch = total[0] / total[1].clamp_min(1.0)
        moved = self.decay * self.distortion + (1 - self.decay) * batch
        self.distortion.copy_(torch.where(self.distortion > 0, moved, batch))

    @torch.no_grad()
    def _ema_write(self, x: torch.Tensor, read: torch.Tensor, codes: torch.Tensor, nearest: torch.Tensor,
                   positions: int) -> None:
        """The ema write of the class docstring for N×D ``x``, its N×D ``read`` (slots before
        this write) and N×(k+1) ``codes``, then re-seeding by the Σ w² mass."""
        x = x.detach().float()
        slots = codes[:, : self.k]
        weights = self.grid[codes[:, self.k]].float() / self.levels  # N×k, 0 for unused entries
        left = (x - read.detach())[:, None, :] + weights[:, :, None] * self.memory[slots]  # N×k×D: z − r + w M_s
        counts = torch.zeros(self.codebook_size, device=x.device).index_add_(0, slots.reshape(-1), weights.pow(2).reshape(-1))
        sums = torch.zeros(self.codebook_size, self.dim, device=x.device).index_add_(
            0, slots.reshape(-1), (weights[:, :, None] * left).reshape(-1, self.dim))
        mass = counts.sum()  # Σ w² over the batch (before ema_write sums counts over ranks)
        Fn.ema_write(self.memory, self.cluster_size, self.embed_sum, counts, sums, self.decay)
        if self.reseed_fraction > 0:
            if Fn.distributed():
                torch.distributed.all_reduce(mass)
            Fn.reseed_dead_slots(self.memory, self.cluster_size, self.embed_sum, x, nearest,
                                 self.reseed_fraction * mass / self.codebook_size, positions)

    @torch.no_grad()
    def _reseed(self, x: torch.Tensor, nearest: torch.Tensor, codes: torch.Tensor, positions: int) -> None:
        """Move the usage averages by this batch's weight mass (summed over ranks) and give
        each slot below the threshold an encoder output of the global batch (see the class docstring)."""
        mass = torch.zeros(self.codebook_size + 1, device=x.device).index_add_(
            0, codes[:, : self.k].reshape(-1), (self.grid[codes[:, self.k]].float() / self.levels).reshape(-1))
        mass[-1] = x.shape[0]  # positions, so that N is every rank's (shares may differ, or be empty)
        if Fn.distributed():
            torch.distributed.all_reduce(mass)
        mean = mass[-1] / self.codebook_size  # N/K, a tensor: no host read
        self.usage.copy_(torch.where(self.usage < 0, mean.expand_as(self.usage),
                                     self.decay * self.usage + (1 - self.decay) * mass[:-1]))
        rows = Fn.global_rows(torch.cat([x.detach().float(), nearest.float()[:, None]], 1), positions)
        if rows.shape[0] == 0:
            return
        pick = torch.multinomial(rows[:, -1].clamp_min(0.0) + 1e-12, self.codebook_size, replacement=True)
        rows = Fn.same_on_every_rank(rows[pick, :-1].contiguous())
        dead = self.usage < self.reseed_fraction * mean
        self.memory.data.copy_(torch.where(dead[:, None], rows, self.memory.data))
        self.usage.copy_(torch.where(dead, mean.expand_as(self.usage), self.usage))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """B×H×W×(k+1) (or B×N×(k+1)) codes -> their reads, B×D×H×W (or B×N×D): the training
        read of those codes bit for bit (any code in range decodes, canonical or not)."""
        if codes.dim() not in (3, 4) or codes.shape[-1] != self.k + 1:
            raise ValueError(f"a mixture of k = {self.k} slots decodes codes B×H×W×{self.k + 1} or "
                             f"B×N×{self.k + 1}, got shape {tuple(codes.shape)}")
        vectors = self._read(self.memory, codes.reshape(-1, self.k + 1)).view(*codes.shape[:-1], self.dim)
        return vectors if codes.dim() == 3 else vectors.permute(0, 3, 1, 2).contiguous()
