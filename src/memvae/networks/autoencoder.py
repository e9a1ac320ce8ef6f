"""Encoder → bottleneck → decoder, with the model's own loss and metrics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memvae.quantizers import BottleneckOutput, bottleneck_class
from memvae.quantizers.base import Options as BottleneckOptions
from memvae.config.schema import Config, ModelConfig
from memvae.networks.encoder_decoder import Decoder, Encoder


@dataclass(frozen=True)
class AutoencoderOutput:
    """Attributes:
    reconstruction: B×3×H×W, on the input's scale.
    loss: scalar to minimise: reconstruction_weight · reconstruction MSE + the bottleneck's loss.
    recon_mse: scalar reconstruction MSE (per pixel and channel).
    bottleneck: the bottleneck's output (codes, weights, metrics).
    """

    reconstruction: torch.Tensor
    loss: torch.Tensor
    recon_mse: torch.Tensor
    bottleneck: BottleneckOutput


def build_bottleneck(cfg: BottleneckOptions, dim: int) -> nn.Module:
    """The registered bottleneck named by ``cfg.kind``, built from the keys it reads."""
    return bottleneck_class(cfg.kind).from_config(cfg, dim)


class Autoencoder(nn.Module):
    """Images B×3×H×W (pixels scaled to [-0.5, 0.5]) -> AutoencoderOutput.

    The encoder halves the side twice, so the bottleneck reads a B×D×(H/4)×(W/4) map
    (8×8 for CIFAR-10); the output's reconstruction is B×3×H×W and its
    ``bottleneck.codes`` B×(H/4)×(W/4). Build one with ``Autoencoder.from_config(cfg)``.
    """

    def __init__(self, model: ModelConfig, bottleneck: BottleneckOptions):
        super().__init__()
        d = model.embedding_dim
        self.encoder = Encoder(model.hidden, model.res_hidden, model.res_blocks, d)
        self.bottleneck = build_bottleneck(bottleneck, d)
        self.decoder = Decoder(model.hidden, model.res_hidden, model.res_blocks, d)
        # The weight of the reconstruction MSE in the loss: 1 under train.reconstruction = "mse";
        # the trainer sets 1 / Var(training pixels) under "nmse" (a property of the data, so
        # it is not a parameter: a checkpoint does not hold it).
        self.reconstruction_weight = 1.0

    @classmethod
    def from_config(cls, cfg: Config) -> "Autoencoder":
        return cls(cfg.model, cfg.bottleneck)

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        z = self.encoder(x)
        # The bottleneck's distances and softmax run in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.bottleneck(z.float())
        reconstruction = self.decoder(out.quantized.to(z.dtype)).float()
        recon_mse = F.mse_loss(reconstruction, x.float())
        return AutoencoderOutput(reconstruction, self.reconstruction_weight * recon_mse + out.loss, recon_mse, out)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The bottleneck's codes -> B×3×H×W images: B×h×w slot indices (each position reads
        its slot's row), or B×h×w×S (residual VQ's S stages; a mixture's k slot indices and
        grid index), decoded by the bottleneck's own ``decode_codes``."""
        return self.decoder(self.bottleneck.decode_codes(codes))
