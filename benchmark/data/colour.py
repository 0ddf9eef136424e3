"""Colour-space conversion: grey <-> RGB for encoders and data that differ, and CIE Lab for the methods that work in
it (colorization, CMC)."""

from __future__ import annotations

import torch
from torch import Tensor


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] to CIE Lab, D65 white (skimage's `rgb2lab`, which the official layer calls).

    Args:
        rgb: (N, 3, H, W), clamped to [0, 1].

    Returns:
        (N, 3, H, W): L in [0, 100], a and b in about [-110, 110].
    """
    c = rgb.float().clamp(0, 1)
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
                     device=c.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], device=c.device)
    xyz = torch.einsum("ij,njhw->nihw", m / white.view(3, 1), linear)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601


def convert_channels(x: Tensor, channels: int) -> Tensor:
    """uint8 images (C, H, W) or (N, C, H, W) with `channels` channels: grey repeated, RGB -> ITU-R 601 luma (rounded).
    Raises ValueError for any other pair."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA).view(3, 1, 1)
        return (x.float() * w).sum(-3, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
