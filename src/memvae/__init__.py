"""memvae: autoencoders with a memory bottleneck.

The public names, for use in your own models::

    from memvae import MemoryRead
    read = MemoryRead(num_slots=512, dim=64, similarity="l2")
    out = read(z)            # z: B×D×H×W
    out.quantized, out.loss, out.codes, out.weights, out.metrics
"""
from memvae.bottlenecks import BottleneckOutput, MemoryRead, VectorQuantizer, VectorQuantizerEMA
from memvae.config import Config, load_config
from memvae.model import Autoencoder

__version__ = "0.1.0"
__all__ = ["MemoryRead", "VectorQuantizer", "VectorQuantizerEMA", "BottleneckOutput", "Autoencoder", "Config", "load_config"]
