"""memvae: autoencoders with a memory bottleneck.

The public names, for use in your own models (everything else is internal)::

    from memvae import MemoryRead
    read = MemoryRead(codebook_size=512, dim=64)   # the study's read: l2, learned β, gradient write
    out = read(z)            # z: B×D×H×W maps or B×N×D sequences
    out.quantized, out.loss, out.codes, out.weights, out.metrics

Bottlenecks: :class:`VectorQuantizer`, :class:`VectorQuantizerEMA`, :class:`MemoryRead`
(its options in parts: :class:`Addressing` with a :class:`LearnedTemperature` or
:class:`RelativeTemperature`, and a :class:`GradientWrite` or :class:`MovingAverageWrite`),
:class:`FSQ`, :class:`ResidualVQ`, :class:`SimVQ`, :class:`IBQ`, :class:`LFQ` (BSQ: ``spherical=True``),
:class:`MixtureRead` and :class:`NoBottleneck`, each returning a :class:`BottleneckOutput` and
exposing ``codebook`` (K×D; S×K×D for residual VQ), ``codebook_size``, ``bits_per_position``
and ``eval_read``. The image model:
:class:`Autoencoder`, built from a :class:`Config` (:func:`load_config` reads one from a
TOML file; ``memvae configs`` lists the packaged ones). The package is typed (PEP 561).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it. Imported on first use (PEP 562), so that ``memvae --help``
# and ``--version`` answer without importing torch.
_PUBLIC = {
    "MemoryRead": "memvae.quantizers", "VectorQuantizer": "memvae.quantizers",
    "VectorQuantizerEMA": "memvae.quantizers", "FSQ": "memvae.quantizers", "ResidualVQ": "memvae.quantizers",
    "SimVQ": "memvae.quantizers", "IBQ": "memvae.quantizers", "LFQ": "memvae.quantizers",
    "MixtureRead": "memvae.quantizers", "NoBottleneck": "memvae.quantizers", "BottleneckOutput": "memvae.quantizers",
    "Addressing": "memvae.quantizers.memory_options",
    "LearnedTemperature": "memvae.quantizers.memory_options",
    "RelativeTemperature": "memvae.quantizers.memory_options",
    "GradientWrite": "memvae.quantizers.memory_options",
    "MovingAverageWrite": "memvae.quantizers.memory_options",
    "Autoencoder": "memvae.networks.autoencoder", "Config": "memvae.config.schema", "load_config": "memvae.config.schema",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'memvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:
    from memvae.quantizers import (FSQ, IBQ, LFQ, BottleneckOutput, MemoryRead, MixtureRead, NoBottleneck, ResidualVQ,
                                   SimVQ, VectorQuantizer, VectorQuantizerEMA)
    from memvae.quantizers.memory_options import Addressing, GradientWrite, LearnedTemperature, MovingAverageWrite, RelativeTemperature
    from memvae.config.schema import Config, load_config
    from memvae.networks.autoencoder import Autoencoder
