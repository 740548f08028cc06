"""The encoder and decoder networks of the CNF-VAE: gated convolutions (van den Berg et al.,
Sylvester flows, 2018, as FFJORD's VAE uses them) or small MLPs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GatedConv2d", "GatedConvTranspose2d", "conv_decoder", "conv_encoder", "mlp"]


class GatedConv2d(nn.Module):
    r"""Gated convolution :math:`y = (W * x + b) \odot \sigma(W_g * x + b_g)` (van den Berg et
    al., Sylvester flows, 2018)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        self.h = nn.Conv2d(c_in, c_out, kernel, stride, padding)
        self.g = nn.Conv2d(c_in, c_out, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConvTranspose2d(nn.Module):
    r"""Gated transposed convolution :math:`y = (W *^\top x + b) \odot \sigma(W_g *^\top x +
    b_g)`."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int = 0, output_padding: int = 0) -> None:
        super().__init__()
        self.h = nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, output_padding)
        self.g = nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, output_padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def conv_encoder(c: int, h: int, w: int, feature_dim: int) -> nn.Sequential:
    """Gated convolutional encoder: images (B, c, h, w) -> features (B, feature_dim)."""
    # Two stride-2 layers take H x W to H/4 x W/4 (7 x 7 for MNIST, 7 x 5 for Frey Faces); the
    # last layer's kernel covers that whole map, leaving a (feature_dim, 1, 1) feature.
    return nn.Sequential(
        GatedConv2d(c, 32, 5, 1, 2), GatedConv2d(32, 32, 5, 2, 2),
        GatedConv2d(32, 64, 5, 1, 2), GatedConv2d(64, 64, 5, 2, 2),
        GatedConv2d(64, 64, 5, 1, 2), GatedConv2d(64, feature_dim, (h // 4, w // 4)),
        nn.Flatten())


def conv_decoder(c: int, h: int, w: int, z_dim: int, classes: int) -> nn.Sequential:
    """Gated transposed-convolution decoder: latents (B, z_dim) -> logits (B, c * classes, h,
    w)."""
    return nn.Sequential(
        nn.Unflatten(1, (z_dim, 1, 1)),
        GatedConvTranspose2d(z_dim, 64, (h // 4, w // 4)), GatedConvTranspose2d(64, 64, 5, 1, 2),
        GatedConvTranspose2d(64, 32, 5, 2, 2, 1), GatedConvTranspose2d(32, 32, 5, 1, 2),
        GatedConvTranspose2d(32, 32, 5, 2, 2, 1), GatedConvTranspose2d(32, 32, 5, 1, 2),
        nn.Conv2d(32, c * classes, 1))


def mlp(sizes: Sequence[int], last_act: bool) -> nn.Sequential:
    """Linear layers of widths ``sizes`` with ELU between them (and after the last with
    ``last_act``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)
