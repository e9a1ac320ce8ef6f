"""memvae: autoencoders with a memory bottleneck.

The public names, for use in your own models (everything else is internal)::

    from memvae import MemoryRead
    read = MemoryRead(num_slots=512, dim=64, similarity="l2")
    out = read(z)            # z: B×D×H×W maps or B×N×D sequences
    out.quantized, out.loss, out.codes, out.weights, out.metrics

Bottlenecks: :class:`VectorQuantizer`, :class:`VectorQuantizerEMA`, :class:`MemoryRead`,
:class:`FSQ`, each returning a :class:`BottleneckOutput`. The image model:
:class:`Autoencoder`, built from a :class:`Config` (:func:`load_config` reads one from a
TOML file; ``memvae configs`` lists the packaged ones). The package is typed (PEP 561).
"""
from memvae.bottlenecks import FSQ, BottleneckOutput, MemoryRead, VectorQuantizer, VectorQuantizerEMA
from memvae.config import Config, load_config
from memvae.model import Autoencoder

__version__ = "0.1.0"
__all__ = [
    "MemoryRead", "VectorQuantizer", "VectorQuantizerEMA", "FSQ", "BottleneckOutput",
    "Autoencoder", "Config", "load_config",
]
