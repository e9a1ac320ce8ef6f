"""The registry of bottlenecks: one name, one class, one file each."""
from __future__ import annotations

from memvae.quantizers.base import Bottleneck, BottleneckOutput
from memvae.quantizers.fsq import FSQ
from memvae.quantizers.ibq import IBQ
from memvae.quantizers.lfq import LFQ
from memvae.quantizers.memory import MemoryRead
from memvae.quantizers.mixture import MixtureRead
from memvae.quantizers.none import NoBottleneck
from memvae.quantizers.residual_vq import ResidualVQ
from memvae.quantizers.simvq import SimVQ
from memvae.quantizers.vq import VectorQuantizer
from memvae.quantizers.vq_ema import VectorQuantizerEMA

REGISTRY: dict[str, type[Bottleneck]] = {
    "vq": VectorQuantizer,
    "vq_ema": VectorQuantizerEMA,
    "memory": MemoryRead,
    "fsq": FSQ,
    "none": NoBottleneck,
    "residual_vq": ResidualVQ,
    "simvq": SimVQ,
    "ibq": IBQ,
    "lfq": LFQ,
    "mixture": MixtureRead,
}


def bottleneck_class(kind: str) -> type[Bottleneck]:
    """The class registered under ``kind``; unknown names fail with the known ones."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown bottleneck {kind!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["Bottleneck", "BottleneckOutput", "FSQ", "IBQ", "LFQ", "MemoryRead", "MixtureRead", "NoBottleneck", "ResidualVQ", "SimVQ", "VectorQuantizer", "VectorQuantizerEMA", "REGISTRY", "bottleneck_class"]
