"""How to fit the prior (:class:`PriorOptions`), apart from :mod:`memvae.prior.fit` so that the
command line can show its defaults without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, fields

from memvae.errors import MemvaeError


@dataclass
class PriorOptions:
    """How to fit the prior.

    Attributes:
        steps: Adam updates.
        batch_size: maps per update.
        lr: Adam learning rate.
        seed: seed of the initialisation and of the batch order.
        width: channels of the PixelCNN.
        layers: gated layers of the PixelCNN.
        kernel: kernel size of its masked convolutions (odd).
        log_every: updates between "train" records.
        eval_every: updates between "eval" records (0: only at the end).
        eval_maps: test maps used by the "eval" records during training (0: all);
            the final eval.json always uses every test map extracted.
        train_images: use only the first N training images (0: all), for quick checks.
        test_images: use only the first N test images (0: all), for quick checks.
        extract_batch: images per batch when extracting codes.
        device: "auto", "cpu", "cuda", ...
        threads: CPU threads for torch (0: $OMP_NUM_THREADS, else 1, as a training's default).
        on_nonfinite: a NaN/Inf loss "stop"s the fit (the last checkpoint kept) or is
            "skip"ped (the update undone, counted in the log), as ``train.on_nonfinite``.
    """

    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    width: int = 64
    layers: int = 8
    kernel: int = 3
    log_every: int = 100
    eval_every: int = 1000
    eval_maps: int = 1000
    train_images: int = 0
    test_images: int = 0
    extract_batch: int = 500
    device: str = "auto"
    threads: int = 0
    on_nonfinite: str = "stop"

    def validate(self) -> "PriorOptions":
        for name in ("steps", "batch_size", "width", "layers", "log_every", "extract_batch"):
            if getattr(self, name) <= 0:
                raise MemvaeError(f"prior option {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("seed", "eval_every", "eval_maps", "train_images", "test_images", "threads"):
            if getattr(self, name) < 0:
                raise MemvaeError(f"prior option {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise MemvaeError(f"prior option lr must be > 0, got {self.lr!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise MemvaeError(f"prior option on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise MemvaeError(f"prior option kernel must be odd and >= 3, got {self.kernel!r}")
        return self

    def command_flags(self) -> list[str]:
        """The ``memvae prior`` options that give these options, defaults left out: what a
        command that continues this fit must repeat (a resumed fit trains to the ``steps``
        its command names, and refuses other network options)."""
        words = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name not in NO_FLAG and value != field.default:
                words += [f"--{field.name.replace('_', '-')}", str(value)]
        return words


# Options that ``memvae prior`` does not take (the library's alone); neither changes the fit.
NO_FLAG = ("eval_maps", "extract_batch")
