"""The VQ-VAE paper's CIFAR-10 encoder and decoder (as in Sonnet's vqvae_example)."""
from __future__ import annotations

import torch
from torch import nn


class ResidualStack(nn.Module):
    """``blocks`` residual blocks (ReLU, 3×3 conv to ``res_hidden``, ReLU, 1×1 conv back,
    added), each with its own weights, then a ReLU. Shape-preserving: B×C×H×W."""

    def __init__(self, channels: int, res_hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, res_hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_hidden, channels, 1),
            )
            for _ in range(blocks)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h)
        return torch.relu(h)


class Encoder(nn.Module):
    """B×3×H×W images -> B×D×(H/4)×(W/4) queries: two 4×4 stride-2 convs, a 3×3 conv,
    a residual stack, and a 1×1 conv to the memory width D."""

    def __init__(self, hidden: int = 128, res_hidden: int = 32, res_blocks: int = 2, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            ResidualStack(hidden, res_hidden, res_blocks),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """B×D×h×w reads -> B×3×4h×4w images: a 3×3 conv, a residual stack and two 4×4
    stride-2 transposed convs (the encoder mirrored)."""

    def __init__(self, hidden: int = 128, res_hidden: int = 32, res_blocks: int = 2, dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            ResidualStack(hidden, res_hidden, res_blocks),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, 3, 4, stride=2, padding=1),
        )

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.net(q)
