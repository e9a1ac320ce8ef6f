"""A gated PixelCNN over maps of slot indices (van den Oord et al. 2016, "Conditional
Image Generation with PixelCNN Decoders"), the prior used to generate from a trained
discrete bottleneck (VQ-VAE paper, section 4).

The model factorises p(c) = Π_t p(c_t | c_<t) over the positions t of an h×w index map
in raster order (row by row, left to right). Two stacks of masked convolutions keep it
causal without the "blind spot" of the original PixelCNN:

- the vertical stack sees every position in the rows *above* (a k×k kernel masked to
  the rows above the centre in the first layer, to the centre row and above after);
- the horizontal stack sees the positions to the *left* in the current row (a 1×k
  kernel masked to the left of the centre in the first layer, up to the centre after),
  and receives the vertical stack's features at each layer.

Because the first layer of both stacks excludes the centre, every later layer may
include it: a position's output depends only on earlier positions. Each layer is a
gated unit tanh(a) ⊙ σ(b) (eq. 2 of the paper); the horizontal stack adds a residual
connection from the second layer on (the first layer's input holds the current
position, so a residual there would leak it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A Conv2d whose kernel is multiplied by a fixed 0/1 mask (same-size output).

    The mask is a buffer, so masked weights receive zero gradient and never act.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], mask: torch.Tensor):
        kh, kw = kernel
        super().__init__(in_channels, out_channels, kernel, padding=(kh // 2, kw // 2))
        if mask.shape != (kh, kw):
            raise ValueError(f"mask must be {kh}×{kw}, got {tuple(mask.shape)}")
        self.register_buffer("mask", mask.to(self.weight.dtype)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def vertical_mask(k: int, include_centre_row: bool) -> torch.Tensor:
    """k×k mask keeping the rows above the centre (and the centre row if asked)."""
    mask = torch.zeros(k, k)
    mask[: k // 2 + int(include_centre_row)] = 1.0
    return mask


def horizontal_mask(k: int, include_centre: bool) -> torch.Tensor:
    """1×k mask keeping the positions left of the centre (and the centre if asked)."""
    mask = torch.zeros(1, k)
    mask[0, : k // 2 + int(include_centre)] = 1.0
    return mask


def gate(x: torch.Tensor) -> torch.Tensor:
    """B×2C×H×W -> B×C×H×W: tanh of the first half times sigmoid of the second."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks, on B×C×H×W features.

    vertical:   v' = gate(V ∗ v)
    horizontal: h' = [h +] W₁ₓ₁ gate(H ∗ h + U₁ₓ₁ (V ∗ v))
    where ∗ is a masked convolution; the residual term ``h +`` is present when
    ``first`` is False.
    """

    def __init__(self, channels: int, kernel: int, first: bool):
        super().__init__()
        self.first = first
        self.v_conv = MaskedConv2d(channels, 2 * channels, (kernel, kernel), vertical_mask(kernel, not first))
        self.h_conv = MaskedConv2d(channels, 2 * channels, (1, kernel), horizontal_mask(kernel, not first))
        # The vertical features enter the horizontal stack pre-gate, as in the paper's Fig. 2.
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v_conv(v)
        h_new = self.h_out(gate(self.h_conv(h) + self.v_to_h(v_pre)))
        return gate(v_pre), h_new if self.first else h + h_new


class GatedPixelCNN(nn.Module):
    """Autoregressive model of B×h×w maps of indices in [0, K): logits of p(c_t | c_<t).

    Args:
        num_slots: K, the number of distinct indices.
        width: C, channels of both stacks (and of the index embedding).
        layers: number of gated layers (≥ 1). With kernel k the vertical stack reaches
            ``layers·(k//2)`` rows up and as many columns sideways, the horizontal stack
            as many columns to the left; 8×8 maps need about 8 layers with k = 3 for
            every position to see all its predecessors.
        kernel: odd kernel size k of the masked convolutions.
        symbol_ranges: None (every index may take any of the K values), or, for maps whose
            columns hold S kinds of symbol in turn (column j holds kind j mod S), S pairs
            (first, size): kind s takes the values [first, first + size) of the K. The logits
            of the other values are −∞ there, so the likelihood puts no mass on indices a
            column cannot hold (a mixture's slot indices and grid index, memvae.prior.codes).
    """

    def __init__(self, num_slots: int, width: int = 64, layers: int = 8, kernel: int = 3,
                 symbol_ranges: list[tuple[int, int]] | None = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 3, got {kernel}")
        self.num_slots, self.width, self.num_layers, self.kernel = num_slots, width, layers, kernel
        self.embed = nn.Embedding(num_slots, width)
        self.layers = nn.ModuleList(GatedLayer(width, kernel, first=(i == 0)) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, num_slots, 1))
        self.symbol_ranges = None if symbol_ranges is None else [(int(a), int(b)) for a, b in symbol_ranges]
        if self.symbol_ranges is not None:
            if any(first < 0 or size < 1 or first + size > num_slots for first, size in self.symbol_ranges):
                raise ValueError(f"symbol_ranges must lie in [0, {num_slots}), got {symbol_ranges}")
            allowed = torch.zeros(len(self.symbol_ranges), num_slots, dtype=torch.bool)
            for kind, (first, size) in enumerate(self.symbol_ranges):
                allowed[kind, first:first + size] = True
            # Not saved: it follows from symbol_ranges, which a prior's checkpoint keeps.
            self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: B×h×w int64 in [0, K) -> logits B×K×h×w, where the logits at (i, j)
        depend only on the codes at positions before (i, j) in raster order."""
        x = self.embed(codes).permute(0, 3, 1, 2)  # B×C×h×w
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h)
        logits = self.head(h)
        if self.symbol_ranges is None:
            return logits
        kinds = torch.arange(codes.shape[2], device=codes.device) % len(self.symbol_ranges)
        return logits.masked_fill(~self.allowed[kinds].t()[None, :, None, :], float("-inf"))  # K×w -> 1×K×1×w

    def nll(self, codes: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood in nats per index of B×h×w codes (scalar)."""
        return F.cross_entropy(self(codes), codes)
