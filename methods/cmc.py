"""CMC: Tian, Krishnan, Isola 2019, "Contrastive Multiview Coding", https://arxiv.org/abs/1906.05849;
official code https://github.com/HobbitLong/CMC.

One crop of an image is split by channels into two views, L and ab of Lab colour space; each view has its
own encoder (the two halves, `l_to_ab` and `ab_to_l` in the official `ResNetV2`), each followed by a Linear
to 128-d and L2 normalisation, and a contrastive loss makes each view pick its partner out of the other
view's embeddings, in both directions. Protocols evaluate the concatenation of both halves' pooled
features on the full image, as the official linear probe does (`LinearProbing.py`, L and ab concatenated).

Where this differs from the official code:
- Loss: the official code uses NCE (or the "full softmax" variant) against a memory bank of 4096-16384
  negatives updated with momentum 0.5. Here the negatives are the other view's embeddings of the rest of
  the batch (in-batch softmax, gathered across processes), at the official temperature 0.07: no
  memory bank, so no stale negatives and nothing to size by the dataset.
- Encoders: both halves are the backbone the benchmark was asked for, deep-copied, with the first Conv2d
  rebuilt for 1 (L) or 2 (ab) input channels (fresh default initialisation); the official ResNet halves are
  full-width ResNets, the AlexNet halves half-width. The second half's weights are re-drawn by permuting
  each tensor's entries, so the halves start independent (as the official two networks do) while keeping
  the backbone's own initial weight distribution.
- One-channel images (Fashion-MNIST, MNIST) have no colour to split. Substitute: the low-pass part of the
  crop (a Gaussian blur, sigma a fixed fraction of the image side) against its high-pass residual (crop
  minus blur). Like L | ab it is a fixed, complementary split of the same crop (the two views add back up
  to the image), so the mutual information to be captured lies between two different signals - coarse
  shape and fine edges/texture - rather than between two augmentations (which would make the method
  SimCLR with two encoders and no same-view negatives). `split="frequency"` also works on RGB images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import first_conv
from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.data.colour import rgb_to_lab
from benchmark.registry import register_method
from benchmark.train.distributed import gather_with_grad, rank

# Lab is normalised per channel to about [-1, 1] with the official constants (train_CMC.py): L in [0, 100],
# a and b over their extremes on the sRGB cube (green/magenta for a, blue/yellow for b).
LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Config:
    feat_dim: int = 128  # per-half embedding size, a Linear + L2 norm on each half (official `--feat_dim 128`)
    temperature: float = 0.07  # official `--nce_t` on ImageNet (0.1 on STL-10)
    split: Literal["auto", "lab", "frequency"] = "auto"  # auto: lab for 3-channel images, frequency for 1-channel
    blur_sigma: float = 1 / 14  # frequency split: Gaussian sigma as a fraction of the image side (2 px at 28 px)
    min_scale: float = 0.08  # smallest random-resized-crop area (official `--crop_low 0.08`)

    def __post_init__(self) -> None:
        check(self.feat_dim > 0, f"cmc.feat_dim must be > 0, got {self.feat_dim}")
        check(self.temperature > 0, f"cmc.temperature must be > 0, got {self.temperature}")
        check(self.split in ("auto", "lab", "frequency"), f"cmc.split must be auto, lab or frequency, got {self.split!r}")
        check(0 < self.blur_sigma <= 0.5, f"cmc.blur_sigma must be in (0, 0.5] (a fraction of the image side), got {self.blur_sigma}")
        check(0 < self.min_scale <= 1, f"cmc.min_scale must be in (0, 1], got {self.min_scale}")


class LabSplit(nn.Module):
    """Normalised RGB (N, 3, H, W) -> (L (N, 1, H, W), ab (N, 2, H, W)), each normalised as in the official code.

    The views arrive normalised with the dataset's per-channel mean/std; the buffers `mean`/`std` undo that
    (set from the dataset by `CMC.before_epoch`; ImageNet's until then) and are saved with the encoder.
    """

    channels = (1, 2)
    mean: Tensor
    std: Tensor
    lab_mean: Tensor
    lab_std: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN))
        self.register_buffer("std", torch.tensor(IMAGENET_STD))
        self.register_buffer("lab_mean", torch.tensor(LAB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_std", torch.tensor(LAB_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # the views themselves stay float32 under bf16 AMP
            rgb = x.float() * self.std.view(1, 3, 1, 1) + self.mean.view(1, 3, 1, 1)
            lab = (rgb_to_lab(rgb) - self.lab_mean) / self.lab_std
        return lab[:, :1], lab[:, 1:]


class FrequencySplit(nn.Module):
    """(N, C, H, W) -> (low-pass (N, C, H, W), high-pass (N, C, H, W)): a Gaussian blur with sigma =
    `sigma` x the image side, and the image minus it. Linear, so it works on normalised inputs directly."""

    def __init__(self, channels: int, sigma: float) -> None:
        super().__init__()
        self.channels = (channels, channels)
        self.sigma = sigma

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # a bf16 blur would leave its rounding in the high-pass view
            return self._split(x.float())

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, c, h, w = x.shape
        s = self.sigma * h
        r = min(math.ceil(3 * s), h - 1, w - 1)  # reflect padding needs radius < side
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t**2) / (2 * s**2))
        k = (k / k.sum()).repeat(c, 1)  # (C, 2r + 1)
        y = F.pad(x, (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(c, 1, 1, -1), groups=c)
        low = F.conv2d(y, k.view(c, 1, -1, 1), groups=c)
        return low, x - low


def in_channels(net: nn.Module) -> int:
    """The input channels of the first Conv2d (in module order) of `net`."""
    return int(first_conv(net, "cmc builds its two encoders by changing the backbone's first Conv2d")[1].in_channels)


def with_in_channels(backbone: nn.Module, channels: int) -> nn.Module:
    """A deep copy of `backbone` whose first Conv2d takes `channels` inputs (freshly initialised if changed).

    Generic over ConvNet (`body.0`), torchvision ResNets (`net.conv1`) and timm ViTs (`net.patch_embed.proj`):
    in each, the first Conv2d in module order is the first layer applied to the image.
    """
    net = copy.deepcopy(backbone)
    name, conv = first_conv(net, "cmc builds its two encoders by changing the backbone's first Conv2d")
    if conv.in_channels != channels:
        new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                        conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)  # type: ignore[arg-type]
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, new)
    return net


@torch.no_grad()
def _redraw(net: nn.Module) -> nn.Module:
    """Permute every parameter's entries: an independent draw from the same i.i.d. initialisation."""
    for p in net.parameters():
        p.copy_(p.flatten()[torch.randperm(p.numel())].view_as(p))
    return net


class TwoViewEncoder(nn.Module):
    """What protocols evaluate: both halves on the full image. (N, C, H, W) normalised -> (N, dim), the two
    halves' pooled features concatenated (view 1 first)."""

    def __init__(self, split: nn.Module, f1: nn.Module, f2: nn.Module) -> None:
        super().__init__()
        self.split, self.f1, self.f2 = split, f1, f2
        self.dim = int(getattr(f1, "dim")) + int(getattr(f2, "dim"))

    def forward(self, x: Tensor) -> Tensor:
        v1, v2 = self.split(x)
        return torch.cat([self.f1(v1), self.f2(v2)], dim=1)


def cmc_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """In-batch contrastive loss between the views, both directions summed (official: `l_loss + ab_loss`).

    L = -1/N sum_i log softmax_j(z1_i . z2_j / t)_i  -  1/N sum_i log softmax_j(z2_i . z1_j / t)_i,
    with unit vectors: each view's embedding must pick its own image's embedding of the OTHER view among the
    batch's (no same-view negatives, as the official memory of view 2 holds only view-2 embeddings).
    Under torch.distributed the candidates come from every process (with gradients) and the anchors are this
    process's rows, so the mean over processes is the loss on the global batch.

    Args:
        z1, z2: (B, D) embeddings of view 1 and view 2; row i of each comes from the same image.
        temperature: t > 0.

    Returns:
        A scalar >= 0; 2 log N when every logit is equal.
    """
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)  # (N, D)
        own = torch.arange(len(z1), device=z1.device) + rank() * len(z1)
        return F.cross_entropy(z1 @ g2.T / temperature, own) + F.cross_entropy(z2 @ g1.T / temperature, own)


# Official: SGD lr 0.03 (batch 256), momentum 0.9, weight decay 1e-4, no warm-up (step decay; cosine here).
@register_method("cmc", config=Config, pretrain=dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, warmup_epochs=0))
class CMC(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        c = in_channels(backbone)
        split = cfg.split if cfg.split != "auto" else ("lab" if c == 3 else "frequency")
        check(split == "frequency" or c == 3, f"cmc.split=lab needs 3-channel (RGB) images, the backbone takes {c}")
        splitter: LabSplit | FrequencySplit = LabSplit() if split == "lab" else FrequencySplit(c, cfg.blur_sigma)
        c1, c2 = splitter.channels
        f1 = with_in_channels(backbone, c1)
        f2 = _redraw(with_in_channels(backbone, c2))
        self.halves = TwoViewEncoder(splitter, f1, f2)
        self.head1 = nn.Linear(int(getattr(f1, "dim")), cfg.feat_dim)  # the official `fc` before `l2norm`
        self.head2 = nn.Linear(int(getattr(f2, "dim")), cfg.feat_dim)

    def views(self, image_size: int) -> list[ViewSpec]:
        # One crop, split into the two views inside loss(); crop and flip only (official train transform).
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), jitter_p=0.0, gray_p=0.0)]

    def before_epoch(self, epoch: int, splits: Any, device: torch.device, seed: int) -> None:
        """Record the dataset's input normalisation, which the Lab split undoes to recover RGB."""
        split = self.halves.split
        if isinstance(split, LabSplit):
            split.mean.copy_(torch.tensor(splits.mean))
            split.std.copy_(torch.tensor(splits.std))

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: one (N, C, H, W) crop; no schedule."""
        v1, v2 = self.halves.split(views[0])
        z1 = self.head1(self.halves.f1(v1))  # (N, feat_dim)
        z2 = self.head2(self.halves.f2(v2))
        return cmc_loss(z1, z2, self.cfg.temperature)

    def encoder(self) -> nn.Module:
        return self.halves
