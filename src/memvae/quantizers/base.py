"""The contract every bottleneck follows.

A bottleneck maps the encoder output ``z`` (B×D×H×W maps, or B×N×D sequences) to what
the decoder reads, position by position: B·H·W (or B·N) queries against a memory of K
slots of width D.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from memvae.quantizers import functional as Fn


@dataclass(frozen=True)
class BottleneckOutput:
    """What every bottleneck returns.

    Attributes:
        quantized: what the decoder receives, in the input's layout (B×D×H×W or B×N×D).
        loss: scalar, the bottleneck's own loss term (0 when it has none).
        codes: B×H×W (or B×N) int64, the slot each position reads most (argmin distance for
            VQ, argmax weight for the memory read); usage is measured from these. None for
            a bottleneck with no codes (the continuous control, kind "none").
        weights: B×H×W×K (or B×N×K) read weights of a soft read, or None (hard reads, and soft
            reads computed without materialising the N×K matrix).
        metrics: scalar tensors for logging (e.g. ``perplexity``, ``beta``,
            ``entropy_bits``), detached.
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    codes: torch.Tensor | None
    weights: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


INITS = ("random", "data")


@dataclass
class Options:
    """A config's ``[bottleneck]`` section for one kind: ``kind`` and that kind's own keys.

    Each bottleneck's file defines its subclass (the keys its ``from_config`` reads, with
    their defaults) and sets it as the class's ``Options``; memvae.config.schema reads the section
    with the options of its kind, so a key the kind does not take fails there, naming the
    kind's keys. :meth:`check` holds every rule on the values, once.
    """

    kind: str = ""

    # Rules on single keys, checked by check(); a subclass adds its own to its parent's.
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ()
    OPEN_UNIT: ClassVar[tuple[str, ...]] = ()  # strictly between 0 and 1
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def check(self) -> None:
        """Raise ValueError naming the key for a value, or a combination of values, this
        kind cannot be built from (a subclass adds its rules across keys after these)."""
        for key in self.POSITIVE:
            if not getattr(self, key) > 0:
                raise ValueError(f"config key 'bottleneck.{key}' must be > 0, got {getattr(self, key)!r}")
        for key in self.NON_NEGATIVE:
            if getattr(self, key) < 0:
                raise ValueError(f"config key 'bottleneck.{key}' must be >= 0, got {getattr(self, key)!r}")
        for key in self.OPEN_UNIT:
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"config key 'bottleneck.{key}' must be in (0, 1), got {getattr(self, key)!r}")
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key 'bottleneck.{key}' must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")


@dataclass
class SlotOptions(Options):
    """The keys of a bottleneck with a memory of K learned slots."""

    slots: int = 512  # K
    init: str = "data"  # "data" (K encoder outputs of the first batch) or "random" (the kind's random start)

    POSITIVE: ClassVar[tuple[str, ...]] = ("slots",)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"init": INITS}


class Bottleneck(nn.Module):
    """Base class: a memory ``self.memory`` of shape K×D plus ``forward(z)``.

    Slots start either "random" (each bottleneck's classic initialisation) or "data":
    copied from K encoder outputs of the first training batch (k-means initialisation
    with no iterations), which keeps slots from starting far from every query.
    """

    codebook_size: int
    dim: int
    # The reads it can be evaluated with (the first is its own), and whether its own read
    # at test is one of codebook_size codes per position (False: a continuous read).
    reads: tuple[str, ...] = ("nearest",)
    stages: int = 1  # codes per position (residual VQ: S, its codes B×H×W×S)
    discrete: bool = True
    # Whether a training forward joins collectives under torch.distributed (moving averages,
    # re-seeding, q̄): then a rank with no positions still takes part, adding nothing, where
    # returning early would leave the other ranks waiting.
    collective: bool = False
    # Its own metrics (names in BottleneckOutput.metrics), declared here so that the training
    # log and evaluation need no list of their own: ``logged_metrics`` are recorded in each
    # training log record (from the interval's last batch) when present; ``averaged_metrics``
    # maps a per-position metric to its name in an evaluation, averaged over every position.
    logged_metrics: tuple[str, ...] = ()
    averaged_metrics: dict[str, str] = {}

    Options: type[Options] = Options  # its [bottleneck] keys (each kind's file sets its own)

    @classmethod
    def from_config(cls, b: Options, dim: int) -> "Bottleneck":
        """The bottleneck a config's ``[bottleneck]`` section (this kind's :class:`Options`)
        asks for; D = ``dim``."""
        raise NotImplementedError  # pragma: no cover - each bottleneck reads its own keys

    @classmethod
    def at_slots(cls, b: Options, slots: int) -> Options:
        """The section ``b`` with K = ``slots`` codes (the rate sweep); ValueError for a K this
        kind cannot take."""
        return dataclasses.replace(b, slots=slots)

    @property
    def eval_read(self) -> str:
        """The read of an evaluation (eval mode), one of ``reads``: the first, unless set."""
        return getattr(self, "_eval_read", self.reads[0])

    @eval_read.setter
    def eval_read(self, read: str) -> None:
        if read not in self.reads:
            raise ValueError(f"{type(self).__name__} reads {', '.join(self.reads)}, not {read!r}")
        self._eval_read = read

    def evaluation_constants(self) -> dict[str, float]:
        """Numbers of the bottleneck itself (not of a batch) reported with an evaluation."""
        return {}

    def _setup_init(self, init: str) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        # A buffer, so a resumed run knows the data initialisation already happened.
        self.register_buffer("initialized", torch.tensor(init != "data"))
        self._initialized_seen = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._initialized_seen = False  # the loaded flag may say "not yet"
        super()._load_from_state_dict(*args, **kwargs)

    def _register_moving_averages(self, memory: torch.Tensor) -> None:
        """Register ``memory`` (K×D) as a buffer with the moving averages of an EMA write,
        consistent from the start: each slot counted once (``cluster_size`` 1, ``embed_sum``
        the slot), so that m_k = s_k / n_k holds before the first write and a slot no vector
        chooses stays where it is. (Counts of 0 with sums equal to the slots divided every
        unchosen slot by about ε on the first write: a random slot of norm 10 became 10⁶.)"""
        self.register_buffer("memory", memory)
        self.register_buffer("cluster_size", torch.ones(memory.shape[0]))
        self.register_buffer("embed_sum", memory.clone())

    @torch.no_grad()
    def _init_from_data(self, x: torch.Tensor, positions: int = 1) -> None:
        """With init = "data", on the first training call: slots ← K rows of x (N×D).

        ``positions`` is the number of rows per image (H·W). Under torch.distributed the
        rows are drawn from the whole global batch (:func:`~memvae.quantizers.functional.global_rows`),
        so any number of processes starts from the slots that one process would.
        """
        if not self.training or self._initialized_seen:
            return
        if bool(self.initialized):  # a host read only until the flag is seen set: it then stays set
            self._initialized_seen = True
            return
        x = Fn.global_rows(x, positions)
        n = x.shape[0]
        pick = torch.randperm(n, device=x.device)[: self.codebook_size] if n >= self.codebook_size else torch.randint(n, (self.codebook_size,), device=x.device)
        rows = Fn.same_on_every_rank(x[pick].float())
        self.memory.data.copy_(rows)
        if hasattr(self, "embed_sum"):
            # Count each slot once, so the moving average starts at the slot itself.
            self.embed_sum.copy_(rows)
            self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> BottleneckOutput:
        """z: B×D×H×W maps or B×N×D sequences, any floating dtype -> BottleneckOutput.

        One rule for every bottleneck: the maths run in float32 with autocast off (distances
        and softmax lose too much in bfloat16), and ``quantized`` comes back in z's dtype;
        ``loss`` is float32. A batch of 0 positions reads and writes nothing, in training
        mode too (under torch.distributed, a bottleneck that joins collectives in training
        still enters them, adding nothing). The reading itself is each bottleneck's :meth:`_forward`.

        ``mask``: B×N booleans for B×N×D sequences, True where a position is real (False:
        padding). Only the real positions are read, as the one sequence 1×M×D of the M real
        positions in order: they alone move moving averages, q̄, re-seeding, the data
        initialisation and the metrics, and the loss is their mean. Padded positions come
        back unchanged (their gradient passes straight through), with code -1 and zero
        weights. Selecting the M positions has a data-dependent size (on a GPU, one read
        from the device per call), and under torch.distributed the data initialisation
        needs the same M on every rank.
        """
        Fn.check_input(z, self.dim)
        if mask is not None:
            return self._forward_masked(z, mask)
        if z.numel() == 0 and not (self.training and Fn.distributed() and self.collective):
            shape = Fn.position_shape(z) + ((self.stages,) if self.stages > 1 else ())
            return BottleneckOutput(quantized=z, loss=z.new_zeros((), dtype=torch.float32),
                                    codes=torch.zeros(shape, dtype=torch.int64, device=z.device))
        with torch.autocast(z.device.type, enabled=False):
            out = self._forward(z.float())
        if out.quantized.dtype == z.dtype:
            return out
        return dataclasses.replace(out, quantized=out.quantized.to(z.dtype))

    def _forward_masked(self, z: torch.Tensor, mask: torch.Tensor) -> BottleneckOutput:
        """:meth:`forward` of the real positions of B×N×D ``z`` (``mask`` B×N, True = real)."""
        if z.dim() != 3:
            raise ValueError(f"a mask is for B×N×D sequences; got a B×D×H×W map of shape {tuple(z.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(z.shape[:2]):
            raise ValueError(f"mask must be B×N booleans of shape {tuple(z.shape[:2])}, got {mask.dtype} of shape {tuple(mask.shape)}")
        mask = mask.to(z.device)
        out = self.forward(z[mask].unsqueeze(0))  # 1×M×D: the batch without its padding
        quantized = z.clone()
        quantized[mask] = out.quantized[0]
        codes = None
        if out.codes is not None:
            codes = torch.full(tuple(mask.shape) + tuple(out.codes.shape[2:]), -1, dtype=out.codes.dtype, device=z.device)
            codes[mask] = out.codes[0]
        weights = None
        if out.weights is not None:
            weights = out.weights.new_zeros(tuple(mask.shape) + (out.weights.shape[-1],))
            weights[mask] = out.weights[0]
        return dataclasses.replace(out, quantized=quantized, codes=codes, weights=weights)

    def _forward(self, z: torch.Tensor) -> BottleneckOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:
        """K×D: the code vectors the decoder may receive, one per code (stages×K×D for residual
        VQ; for FSQ and LFQ/BSQ the vectors their codes decode to)."""
        return self.memory

    @property
    def bits_per_position(self) -> float:
        """The fixed-length rate of one position's code: stages·log2 K bits."""
        return math.log2(self.codebook_size) * self.stages

    def symbol_sizes(self) -> tuple[int, ...]:
        """How many values each of a position's ``stages`` code symbols takes (K each here;
        a mixture's grid index takes its own number): the vocabularies a prior models."""
        return (self.codebook_size,) * self.stages

    def slot_counts(self, codes: torch.Tensor) -> torch.Tensor:
        """How often each slot is read among ``codes`` (this bottleneck's codes, any batch)
        -> int64 counts, S·K for S stages (stage s's slots counted as slots s·K ... s·K + K − 1)."""
        k = max(self.codebook_size, 1)
        if self.stages > 1:  # B×h×w×S
            codes = codes + torch.arange(self.stages, device=codes.device) * k
        return Fn.code_counts(codes, k * self.stages)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Slot indices -> slot vectors (the hard read of those codes): B×H×W -> B×D×H×W,
        or B×N -> B×N×D."""
        vectors = self.codebook[codes]
        return vectors if codes.dim() == 2 else vectors.permute(0, 3, 1, 2).contiguous()
