"""The options of :class:`~memvae.quantizers.memory.MemoryRead`, in one form: its parts.

How a query addresses the slots (:class:`Addressing`: similarity, temperature, top-k), how
the slots are written (:class:`GradientWrite` or :class:`MovingAverageWrite`, with the
encoder's gradient), and which reads it makes (:func:`check_reads`). Each part checks its
values when built, so a combination that cannot work cannot be built; a config's flat keys
(:class:`MemoryOptions`) become the parts in :func:`memory_parts`, the one place they are read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memvae.quantizers.base import SlotOptions

SIMILARITIES = ("l2", "cosine")
TRAIN_READS = ("soft", "straight_through")
EVAL_READS = ("soft", "hard")
WRITES = ("gradient", "soft_ema", "hard_ema")
TEMPERATURES = ("learned", "relative")
ENCODER_GRADIENTS = ("read", "straight_through", "rotation")
IMPLS = ("auto", "dense", "fused")


def _need(ok: bool, text: str) -> None:
    if not ok:
        raise ValueError(text)


@dataclass(frozen=True)
class LearnedTemperature:
    """β = exp(log β), learned from ``beta_init`` (the study's model)."""

    beta_init: float = 1.0

    def __post_init__(self):
        _need(self.beta_init > 0, f"beta_init must be > 0, got {self.beta_init}")


@dataclass(frozen=True)
class RelativeTemperature:
    """β = 1/(τ·q̄): q̄ the moving average (γ = ``decay``) of the squared distance to the
    nearest slot, τ annealed geometrically from ``start`` to ``end`` over ``anneal``
    training updates, then held."""

    start: float = 1.0
    end: float = 0.1
    anneal: int = 2000
    decay: float = 0.99

    def __post_init__(self):
        _need(self.start > 0 and self.end > 0, f"tau must be > 0, got ({self.start}, {self.end})")
        _need(self.anneal >= 1, f"tau_anneal must be a number of updates >= 1, got {self.anneal}")
        _need(0 < self.decay < 1, f"decay must be in (0, 1), got {self.decay}")


@dataclass(frozen=True)
class Addressing:
    """How each query addresses the K slots: ``similarity`` "l2" or "cosine", the
    ``temperature`` that sharpens it, and ``top_k`` (k > 0: only each query's k largest
    logits are read; 0: all K)."""

    similarity: str = "l2"
    temperature: LearnedTemperature | RelativeTemperature = LearnedTemperature()
    top_k: int = 0

    def __post_init__(self):
        _need(self.similarity in SIMILARITIES, f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        _need(isinstance(self.temperature, (LearnedTemperature, RelativeTemperature)),
              f"temperature must be a LearnedTemperature or a RelativeTemperature, got {self.temperature!r}")
        _need(self.top_k >= 0, f"top_k must be >= 0 (0: the dense read), got {self.top_k}")


@dataclass(frozen=True)
class GradientWrite:
    """M is a parameter trained through the read (the study's model); the encoder gets the
    read's own gradient."""


@dataclass(frozen=True)
class MovingAverageWrite:
    """M is a buffer moved toward the encoder vectors that read each slot: ``weights``
    "soft" (by their read weights) or "hard" (one-hot on the slot read most: vq_ema's
    write); γ = ``decay``; the loss gains ``commitment``·‖z − sg(r)‖²; slots whose count
    falls below ``reseed_fraction`` of the mean count N/K are re-seeded (0: never). As M
    gets no gradient, the encoder's may be the read's ("read"), z + sg(r − z)
    ("straight_through") or the rotation trick ("rotation")."""

    weights: str = "hard"
    decay: float = 0.99
    commitment: float = 0.25
    reseed_fraction: float = 0.0
    encoder_gradient: str = "read"

    def __post_init__(self):
        _need(self.weights in ("soft", "hard"), f"weights must be 'soft' or 'hard', got {self.weights!r}")
        _need(0 < self.decay < 1, f"decay must be in (0, 1), got {self.decay}")
        _need(self.commitment >= 0, f"commitment must be >= 0, got {self.commitment}")
        _need(self.reseed_fraction >= 0, f"reseed_fraction must be >= 0, got {self.reseed_fraction}")
        _need(self.encoder_gradient in ENCODER_GRADIENTS,
              f"encoder_gradient must be one of {ENCODER_GRADIENTS}, got {self.encoder_gradient!r}")


def memory_parts(b: "MemoryOptions") -> tuple[Addressing, GradientWrite | MovingAverageWrite]:
    """A config's flat memory keys -> (addressing, write); ValueError for values or a
    combination that cannot work (encoder_gradient or reseed_fraction with the gradient write)."""
    if b.write == "gradient" and (b.encoder_gradient != "read" or b.reseed_fraction > 0):
        raise ValueError(f"bottleneck.encoder_gradient={b.encoder_gradient!r} and bottleneck.reseed_fraction need a "
                         "moving-average write (bottleneck.write = 'soft_ema' or 'hard_ema'): with the gradient write "
                         "the slots get no gradient")
    temperature = (RelativeTemperature(b.tau_start, b.tau_end, b.tau_anneal_updates, b.decay) if b.temperature == "relative"
                   else LearnedTemperature(b.beta_init))
    write = GradientWrite() if b.write == "gradient" else MovingAverageWrite(
        b.write.removesuffix("_ema"), b.decay, b.commitment, b.reseed_fraction, b.encoder_gradient)
    return Addressing(b.similarity, temperature, b.top_k), write


def check_reads(train_read: str, eval_read: str, impl: str, top_k: int, codebook_size: int) -> None:
    """ValueError for a read MemoryRead cannot make: the reads and the kernel by name, and
    ``top_k`` (already >= 0 by :class:`Addressing`) at most the K slots."""
    for name, value, allowed in (("train_read", train_read, TRAIN_READS), ("eval_read", eval_read, EVAL_READS),
                                 ("impl", impl, IMPLS)):
        _need(value in allowed, f"{name} must be one of {allowed}, got {value!r}")
    _need(top_k <= codebook_size, f"top_k must be between 0 (dense) and the {codebook_size} slots, got {top_k}")


@dataclass
class MemoryOptions(SlotOptions):
    """A config's ``[bottleneck]`` keys for kind "memory": flat, as TOML writes them. They
    are read into the parts once (:func:`memory_parts`), which check them."""

    kind: str = "memory"
    commitment: float = 0.25  # the moving-average writes' commitment weight
    decay: float = 0.99  # the moving-average writes' γ
    similarity: str = "l2"  # "l2" or "cosine"
    beta_init: float = 1.0  # initial β (temperature = "learned")
    eval_read: str = "soft"  # the read in evaluation, "soft" or "hard"
    train_read: str = "soft"  # "soft" or "straight_through"
    tau_start: float = 1.0  # the relative temperature's τ at the start
    tau_end: float = 0.1  # ... and at the end of its annealing (geometric in between)
    tau_anneal_updates: int = 2000  # training updates over which τ anneals, then held at tau_end
    temperature: str = "learned"  # "learned" β, or "relative" β = 1/(τ·q̄)
    encoder_gradient: str = "read"  # "read" (through the read), "straight_through" (z + sg(read − z)) or "rotation"
    write: str = "gradient"  # "gradient", "soft_ema" or "hard_ema"
    reseed_fraction: float = 0.0  # moving-average writes: re-seed slots whose count is below this fraction of N/K
    impl: str = "auto"  # "auto", "dense" or "fused"
    top_k: int = 0  # read each query's k largest logits only (0: all K, the dense read)

    # Single-key rules, checked here too so that a config's error names its key.
    POSITIVE: ClassVar[tuple[str, ...]] = ("slots", "beta_init", "tau_start", "tau_end", "tau_anneal_updates")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("commitment", "reseed_fraction", "top_k")
    OPEN_UNIT: ClassVar[tuple[str, ...]] = ("decay",)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **SlotOptions.CHOICES, "similarity": SIMILARITIES, "eval_read": EVAL_READS, "train_read": TRAIN_READS,
        "write": WRITES, "temperature": TEMPERATURES, "encoder_gradient": ENCODER_GRADIENTS, "impl": IMPLS}

    def check(self) -> None:
        super().check()
        try:
            memory_parts(self)
            check_reads(self.train_read, self.eval_read, self.impl, self.top_k, self.slots)
        except ValueError as e:
            raise ValueError(f"config [bottleneck] of kind memory: {e}") from None
