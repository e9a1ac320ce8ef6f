"""The soft, differentiable memory read studied here (NTM-style content addressing)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from memvae.quantizers import functional as Fn
from memvae.quantizers.base import Bottleneck, BottleneckOutput
from memvae.quantizers.memory_fused import FusedRead
from memvae.quantizers.memory_top_k import TopKRead
from memvae.quantizers.memory_options import (Addressing, GradientWrite, MemoryOptions, MovingAverageWrite,
                                              RelativeTemperature, check_reads, memory_parts)

class MemoryRead(FusedRead, TopKRead, Bottleneck):
    """Content-addressed soft read of a memory M (K×D), as in the Neural Turing Machine.

    z (B×D×H×W maps or B×N×D sequences) -> BottleneckOutput: quantized in z's layout,
    codes B×H×W (or B×N), weights B×H×W×K (or B×N×K) when held.

    For each position's query z (D):
        w = softmax(β·s(z, M_k))          s = −‖z − M_k‖² ("l2") or cos(z, M_k) ("cosine")
        r = Σ_k w_k M_k                   (the "soft" read, what the decoder receives)
    Temperature:
        learned:  β = exp(log β) > 0 is learned (the study's model).
        relative: β = 1 / (τ·q̄) (l2), so that the logits are −‖z − M_k‖² / (τ·q̄): q̄ is a
                  moving average (decay ``decay``, training mode only, a buffer saved in
                  checkpoints and all-reduced under torch.distributed) of the mean squared
                  distance from each z to its nearest slot, the codebook's own resolution.
                  Scaling z and M alike leaves the weights unchanged, so the sharpness does
                  not drift with the encoder's scale. τ follows ``tau`` (below). For cosine,
                  distances are ‖ẑ − m̂‖² = 2 − 2 cos and β = 2 / (τ·q̄).
    The relative temperature's τ is annealed geometrically from ``start`` to ``end`` over the
    first ``anneal`` training updates (then held at its end value). The module counts
    its own training forward passes (the buffer ``updates``, saved with the weights), so
    the schedule runs in any training loop, with nothing to call.

    The l2 logits use −β‖z − m‖² = 2β z·m − β‖m‖² − β‖z‖², dropping the last term,
    which is the same for every slot. The read is then attention with query [z, 1] and
    key [2β m, −β‖m‖²], which the fused path hands to
    ``F.scaled_dot_product_attention`` so that the N×K weights are never held.

    Reads (``train_read`` in training mode, ``eval_read`` in eval mode):
        soft:             r as above.
        hard:             M_argmax(w): a discrete read, log2 K bits per position (as
                          τ → 0 the soft read tends to it).
        straight_through: forward M_argmax(w), backward the gradient of the soft read.

    ``encoder_gradient``: "read" (the gradient of the read itself reaches z, M and β),
    "straight_through" (output z + sg(read − z), VQ-VAE's estimator: the decoder sees the
    read, z gets the decoder's gradient unchanged) or "rotation" (the decoder's gradient
    rotated and rescaled as z would be to reach the read,
    :func:`~memvae.quantizers.functional.rotation_trick`). The last two need a
    moving-average write, as M then gets no gradient.

    Writes:
        gradient: M is a parameter trained through the read (the study's model).
        soft_ema: M is a buffer; in training mode each slot moves toward the mean of the
                  encoder vectors weighted by their read weights (see
                  :func:`~memvae.quantizers.functional.ema_write`, with A = w), and the
                  loss gains commitment·‖z − sg(r)‖². With one-hot w this is vq_ema's update.
        hard_ema: the same with one-hot w (argmax slot): vq_ema's write, whatever the read.
    ``reseed_fraction`` > 0 (moving-average writes): slots whose moving-average count falls
    below that fraction of the mean count N/K take recent encoder vectors far from every
    slot (:func:`~memvae.quantizers.functional.reseed_dead_slots`).

    Top-k read (``top_k`` = k > 0; product-key memories, Lample et al. 2019): each query's
    k largest logits l, and only those enter the read:
        T_n = the k slots of largest l_nk,   w_nj = softmax_{j ∈ T_n}(l_nj),   r_n = Σ_{j ∈ T_n} w_nj M_j
    T_n comes from the β-free scores (one N×K×D product, chunked, as VQ computes; β > 0
    does not change the order), which also give the relative temperature its nearest
    distances. Gradients reach z, M and β only through the k logits, recomputed from the k
    gathered slots; the softmax, the read and its backward cost N·k, not N·K, and the N×K
    weights are never held (``weights`` is None). ``outside_mass`` (a metric, mean over
    positions) is the weight the dense softmax puts outside T_n,
    1 − Σ_{j ∈ T_n} softmax_K(l_n)_j: the read differs from the dense one by at most twice
    that mass times the largest slot norm. It takes a second N×K product, so a training
    update measures it on every s-th query only (at most ``OUTSIDE_MASS_ROWS``);
    evaluation on every query. The statistics (entropy, max weight, codes = the slot of
    largest weight) are those of the k weights the read uses; with k = K the read is the
    dense one. The soft write, with top-k, moves each slot by the k weights (counts and
    sums by ``index_add_``).

    Args:
        codebook_size: K.  dim: D.
        addressing: :class:`Addressing`: the similarity, the temperature
            (:class:`LearnedTemperature` β, or :class:`RelativeTemperature` 1/(τ·q̄) with τ's
            schedule) and ``top_k``.
        write: :class:`GradientWrite` (M a parameter) or :class:`MovingAverageWrite` (M a
            buffer; its decay, commitment, re-seeding and the encoder's gradient).
        train_read: the read in training mode ("soft" or "straight_through").
        eval_read: the read in eval mode ("soft" or "hard"); may be changed after training.
        impl: "dense" (holds N×K weights), "fused" (does not), or "auto" (fused when
            N·K > ``fused_threshold`` and the read allows it).
        init: "data" (the default, see Bottleneck) or "random" (N(0, 1) slots, the study's;
            with a moving-average write N(0, 1) slots collapse onto the few of smallest norm,
            measured: 3 slots in use after 300 updates).
        chunk: queries per chunk when statistics are computed without the full matrix
            (fewer when chunk·K would exceed ``fused_threshold``).

    The config's flat keys (``bottleneck.similarity``, ``write``, ``tau_start``, ...: the
    :class:`MemoryOptions`) become these parts in :func:`memory_parts`.
    """

    Options = MemoryOptions

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        addressing: Addressing = Addressing(),
        write: GradientWrite | MovingAverageWrite = GradientWrite(),
        train_read: str = "soft",
        eval_read: str = "soft",
        impl: str = "auto",
        init: str = "data",
        fused_threshold: int = 1 << 22,
        chunk: int = 4096,
    ):
        super().__init__()
        if not isinstance(addressing, Addressing):
            raise ValueError(f"addressing must be an Addressing, got {addressing!r}")
        if not isinstance(write, (GradientWrite, MovingAverageWrite)):
            raise ValueError(f"write must be a GradientWrite or a MovingAverageWrite, got {write!r}")
        check_reads(train_read, eval_read, impl, addressing.top_k, codebook_size)
        self.codebook_size, self.dim = codebook_size, dim
        # The options are kept as their parts only; the properties below read them.
        self.addressing, self.write_rule = addressing, write
        self._eval_read, self.train_read = eval_read, train_read
        self.impl, self.fused_threshold, self.chunk = impl, fused_threshold, chunk
        t, ema = addressing.temperature, isinstance(write, MovingAverageWrite)
        relative = isinstance(t, RelativeTemperature)
        beta_init = 1.0 if relative else t.beta_init
        memory = torch.randn(codebook_size, dim)
        if not ema:
            self.memory = nn.Parameter(memory)
        else:
            self._register_moving_averages(memory)
        if not relative:
            # A parameter only where the read's gradient trains it (DDP needs every parameter
            # used); behind a straight-through or rotated encoder gradient β stays fixed.
            log_beta = torch.tensor(math.log(beta_init))
            if self.encoder_gradient == "read":
                self.log_beta = nn.Parameter(log_beta)
            else:
                self.register_buffer("log_beta", log_beta)
        if relative:
            # q̄; 0 until the first training batch sets it.
            self.register_buffer("distortion", torch.zeros(()))
        # Training forward passes so far: the τ schedule's clock, on the device (no host read).
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self._setup_init(init)

    reads = ("soft", "hard")

    # The parts' values, under the names the read uses.
    @property
    def similarity(self) -> str:
        return self.addressing.similarity

    @property
    def top_k(self) -> int:
        return self.addressing.top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        """Read each query's k largest logits from now on (benchmarks compare k on one trained model)."""
        check_reads(self.train_read, self.eval_read, self.impl, k, self.codebook_size)
        self.addressing = dataclasses.replace(self.addressing, top_k=k)

    @property
    def temperature(self) -> str:
        """ "relative" (β = 1/(τ·q̄)) or "learned"."""
        return "relative" if isinstance(self.addressing.temperature, RelativeTemperature) else "learned"

    @property
    def write(self) -> str:
        """ "gradient", "soft_ema" or "hard_ema"."""
        w = self.write_rule
        return f"{w.weights}_ema" if isinstance(w, MovingAverageWrite) else "gradient"

    def _write_option(self, name: str, otherwise):
        """A moving-average write's option ``name``; ``otherwise`` for the gradient write."""
        return getattr(self.write_rule, name) if isinstance(self.write_rule, MovingAverageWrite) else otherwise

    @property
    def decay(self) -> float:
        return self._write_option("decay", 0.99)

    @property
    def commitment(self) -> float:
        return self._write_option("commitment", 0.0)

    @property
    def reseed_fraction(self) -> float:
        return self._write_option("reseed_fraction", 0.0)

    @property
    def encoder_gradient(self) -> str:
        return self._write_option("encoder_gradient", "read")

    @property
    def collective(self) -> bool:
        """Moving averages, re-seeding, data initialisation and q̄ are reduced over ranks."""
        return self.write != "gradient" or self.temperature == "relative" or self.init == "data"

    logged_metrics = ("beta", "entropy_bits", "max_weight", "outside_mass")  # outside_mass: top-k only
    averaged_metrics = {"entropy_bits": "entropy_bits", "max_weight": "max_weight", "confident": "confident_frac",
                        "outside_mass": "outside_mass"}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs saved before log β existed only where it is trained carry one under a relative
        # temperature: nothing reads it, so it is dropped.
        if not hasattr(self, "log_beta"):
            state_dict.pop(prefix + "log_beta", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_config(cls, b, dim: int) -> "MemoryRead":
        addressing, write = memory_parts(b)
        return cls(b.slots, dim, addressing, write, train_read=b.train_read, eval_read=b.eval_read, impl=b.impl,
                   init=b.init)

    def evaluation_constants(self) -> dict[str, float]:
        return {"beta": float(self.beta())}

    @property
    def discrete(self) -> bool:
        """One slot per position at test: the hard read."""
        return self.eval_read == "hard"

    def beta(self) -> torch.Tensor:
        """The effective β (scalar tensor): the learned value times its schedule, or with the
        relative temperature 1/(τ·q̄) (2/(τ·q̄) for cosine; not learned)."""
        if self.temperature == "relative":
            scale = 2.0 if self.similarity == "cosine" else 1.0
            return scale / (self.tau() * self.distortion.clamp_min(1e-12))
        return self.log_beta.exp()

    def tau(self) -> torch.Tensor:
        """The annealed τ after ``updates`` training forward passes (a float32 scalar tensor;
        computed in float64, as a Python float would be)."""
        t = self.addressing.temperature
        start, end, anneal = (t.start, t.end, t.anneal) if self.temperature == "relative" else (1.0, 0.1, 1)
        done = (self.updates.double() / anneal).clamp(max=1.0)
        # A Python base, not a tensor made from it: that would be a blocking copy to the GPU
        # at every update (the same float64 pow, to the bit).
        return (start * torch.pow(end / start, done)).float()

    @torch.no_grad()
    def _distances(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """N: each query's squared distance to its nearest slot, in the similarity's own
        terms (‖ẑ − m̂‖² for cosine)."""
        if self.similarity == "cosine":
            x, memory = F.normalize(x.float(), dim=1), F.normalize(memory.float(), dim=1)
        return Fn.nearest_distances(x, memory)[1]

    def scores(self, x: torch.Tensor, memory: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """s(x, M) up to a per-row constant, without β: N×D -> N×K (float32), 2x·m − ‖m‖² for
        l2 (−‖x − m‖² + ‖x‖²), x̂·m̂ for cosine; written into ``out`` (N×K) when given."""
        x, memory = x.float(), memory.float()
        if self.similarity == "l2":
            return torch.addmm(-memory.pow(2).sum(1), x, 2.0 * memory.t(), out=out)
        return torch.mm(F.normalize(x, dim=1), F.normalize(memory, dim=1).t(), out=out)

    @torch.no_grad()
    def _distances_from_scores(self, x: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """:meth:`_distances` from each query's largest :meth:`scores`, N, already computed: N."""
        if self.similarity == "l2":
            return (x.float().pow(2).sum(1) - best).clamp_min(0.0)
        return (2.0 - 2.0 * best).clamp_min(0.0)

    @torch.no_grad()
    def _track_distortion(self, distances: torch.Tensor) -> None:
        """q̄ ← γ q̄ + (1 − γ) mean(distances); the first batch sets it (no host sync)."""
        batch = distances.mean() if distances.numel() else distances.new_zeros(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # The mean over every rank's positions (a rank with none adds nothing).
            total = torch.stack([distances.sum(), distances.new_tensor(float(distances.numel()))])
            torch.distributed.all_reduce(total)
            batch = total[0] / total[1]
        decay = self.addressing.temperature.decay
        moved = decay * self.distortion + (1 - decay) * batch
        self.distortion.copy_(torch.where(self.distortion > 0, moved, batch))

    def logits(self, x: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """β·s(x, M) up to a per-row constant, N×D queries -> N×K (float32).

        β scales the K×D operand, not the N×K product: one N×K matrix fewer, forward
        and backward.
        """
        x, memory = x.float(), memory.float()
        if self.similarity == "l2":
            return torch.addmm(-beta * memory.pow(2).sum(1), x, (2.0 * beta * memory).t())
        return F.normalize(x, dim=1) @ (beta * F.normalize(memory, dim=1)).t()

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z: B×D×H×W or B×N×D -> BottleneckOutput (quantized in z's layout, codes B×H×W or
        B×N, weights B×H×W×K or B×N×K, None when computed fused or with the top-k read)."""
        x = Fn.flatten_positions(z)
        self._init_from_data(x, Fn.positions_per_item(z))
        n = x.shape[0]
        mode = self.train_read if self.training else self.eval_read
        ema = self.training and self.write != "gradient"
        # A moving-average write changes the memory in place after the read; the read keeps its own copy.
        memory = self.memory.clone() if ema else self.memory
        loss = x.new_zeros(())
        weights = None
        fused_ok = mode in ("soft", "hard")
        use_fused = fused_ok and (self.impl == "fused" or (self.impl == "auto" and n * self.codebook_size > self.fused_threshold))
        soft_sums = ema and self.write == "soft_ema"
        # With a straight-through or rotated gradient the read's own graph is never used.
        track = torch.is_grad_enabled() and self.encoder_gradient == "read"
        # The relative temperature needs each query's nearest distance before β is known: in
        # the dense path it comes from the β-free scores, which then become the logits (one
        # N×K×D product, not two); in the top-k read from the k largest scores.
        top_scores = slots = scores = None
        if self.top_k:
            top_scores, slots = self._top_k_scores(x, memory)
        else:
            with torch.set_grad_enabled(track):
                scores = self.scores(x, memory) if self.temperature == "relative" and not use_fused else None
        distances = None
        if self.training and (self.temperature == "relative" or self.reseed_fraction > 0):
            if top_scores is not None:
                distances = self._distances_from_scores(x, top_scores[:, 0])
            elif scores is not None:
                distances = self._distances_from_scores(x, scores.detach().max(1).values)
            else:
                distances = self._distances(x, memory)
            if self.temperature == "relative":
                self._track_distortion(distances)
        beta = self.beta()

        with torch.set_grad_enabled(track):
            if self.top_k:
                idx, stats, read, counts, sums = self._top_k_read(x, memory, beta, top_scores, slots, mode, soft_sums)
            elif use_fused:
                idx, stats, counts, sums = self._chunked_statistics(x, memory, beta, soft_sums)
                read = memory.index_select(0, idx) if mode == "hard" else self._fused_read(x, memory, beta)
            else:
                logits = self.logits(x, memory, beta) if scores is None else beta * scores
                w = logits.softmax(1)
                stats, idx = Fn.weight_statistics(logits, w)
                if mode == "hard":
                    read = memory.index_select(0, idx)
                else:
                    read = w @ memory
                    if mode == "straight_through":
                        read = Fn.straight_through(read, memory.index_select(0, idx))
                if soft_sums:
                    wd = w.detach()
                    counts, sums = wd.sum(0), wd.t() @ x.detach().float()
                weights = w.view(*Fn.position_shape(z), self.codebook_size)

        if ema:
            if not soft_sums:
                counts, sums = Fn.assignment_sums(idx, x, self.codebook_size)
            Fn.ema_write(self.memory, self.cluster_size, self.embed_sum, counts, sums, self.decay)
            if self.reseed_fraction > 0:
                Fn.reseed_dead_slots(self.memory, self.cluster_size, self.embed_sum, x, distances,
                                     Fn.dead_count(self.reseed_fraction, n, self.codebook_size, x.device), Fn.positions_per_item(z))

        read = read.to(x.dtype)
        if self.write != "gradient" and self.training:
            loss = loss + self.commitment * Fn.mean_squared_error(x, read.detach())
        if self.encoder_gradient == "straight_through":
            read = Fn.straight_through(x, read)
        elif self.encoder_gradient == "rotation":
            read = Fn.rotation_trick(x, read)
        metrics = {key: (value / n).detach() for key, value in stats.items()}
        metrics["perplexity"] = Fn.perplexity_from_counts(Fn.code_counts(idx, self.codebook_size)).detach()
        metrics["beta"] = beta.detach()
        if self.training:
            self.updates += 1
        return BottleneckOutput(
            quantized=Fn.unflatten_positions(read, z),
            loss=loss,
            codes=idx.view(Fn.position_shape(z)),
            weights=weights,
            metrics=metrics,
        )
