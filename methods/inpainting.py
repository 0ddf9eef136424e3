"""Context Encoders: Pathak et al. 2016, "Context Encoders: Feature Learning by Inpainting",
https://arxiv.org/abs/1604.07379; official code https://github.com/pathak22/context-encoder (train.lua: centre
region; train_random.lua: random region).

Part of the image is hidden from the encoder (filled with the dataset mean, 0 after our normalisation) and a
decoder predicts it from the encoder's features. Official centre mode (the default): the central square of
half the side, 1/4 of the area, is predicted, but only its interior is hidden: a ring `overlap` pixels wide
(4 px at 128 px) stays visible, and the decoder must reproduce it too. Loss: squared error over the predicted
region, the ring weighted 10x (official `overlapL2Weight`), as a weighted mean (the official divides by the
element count instead: see `inpainting_loss`). Protocols evaluate the backbone on whole, unmasked images.

Where this differs from the official code (noted inline):
- Our backbones output POOLED (N, dim) features. The official encoder is a conv net ending in a 4000-channel
  bottleneck (the paper's AlexNet: a channel-wise FC on pool5). Here the pooled vector goes through the
  official bottleneck BN + LeakyReLU(0.2), a Linear to a 4x4 map (the official first decoder layer is a 4x4
  transposed conv on the 1x1 bottleneck, the same map) and stages of nearest upsampling + 3x3 conv + BN + ReLU
  that end exactly at the region's size (DCGAN's 4x4 stride-2 transposed convs would tie the weights to one
  image size, which the module does not know when it is built). No final tanh: targets are standardised
  pixels, not the official [-1, 1] range.
- The loss is a weighted mean over the region, the official a weighted sum divided by the element count: the
  same gradient direction, scaled (see `inpainting_loss`).
- Only the reconstruction loss. The official recipe adds an adversarial term with weight 0.001 (wtl2=0.999);
  the released feature-learning model (README, "Features Caffemodel") is trained with the reconstruction loss
  only. `adv_weight > 0` is a ConfigError.
- `region="random"`: the official noise pattern (uniform noise on a coarse grid, bicubically upsampled,
  thresholded at 0.25 and redrawn until 20-30% of the crop is covered; one mask for the whole batch) is drawn
  per image and thresholded at its own quantile so that exactly `mask_area` is hidden; 4 grid cells per side
  (official: 0.06 cells per pixel, 3.8 per side at the README's better-performing 64 px setting). The ring is
  the visible pixels within `overlap` of the hidden ones, as in the centre mode; the loss covers hidden + ring
  only (the official command, `useOverlapPred=0`, takes the plain L2 over the whole image).
- Views: a mild square crop (75-100% of the area, resized) and flip; officially a random 128 px crop (no
  resize) of the image resized to 350 px on its short side, plus flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.errors import ConfigError
from benchmark.registry import register_method

START = 4  # side of the decoder's first map (official: a 4x4 transposed conv on the 1x1 bottleneck)


@dataclass(frozen=True)
class Config:
    region: Literal["center", "random"] = "center"  # official train.lua (centre square) / train_random.lua (random blobs)
    # centre: area of the predicted square (official: half the side, fineSize/2); random: hidden area (official density 0.25)
    mask_area: float = 0.25
    overlap: float = 4 / 128  # ring width / image side (official overlapPred=4 at fineSize=128); >= 1 px when > 0
    overlap_weight: float = 10.0  # loss weight of the ring (official overlapL2Weight = 10)
    adv_weight: float = 0.0  # adversarial term (official 1 - wtl2 = 0.001): not implemented, must be 0
    random_cells: int = 4  # random region: noise cells per image side (official 0.06 per pixel: 3.8 at 64 px)
    decoder_width: int = 64  # channels of the last decoder stage, doubled per earlier stage (official ngf = 64)
    decoder_stages: int = 3  # upsampling stages after the 4x4 map (official: 3 BN-ReLU stages, then one to nc)
    min_scale: float = 0.75  # crop area range (min_scale, 1); see the module docstring

    def __post_init__(self) -> None:
        check(self.region in ("center", "random"), f"inpainting.region must be center or random, got {self.region!r}")
        check(0 < self.mask_area < 1, f"inpainting.mask_area must be in (0, 1), got {self.mask_area}")
        check(0 <= self.overlap < 0.5, f"inpainting.overlap must be in [0, 0.5), got {self.overlap}")
        check(self.overlap_weight >= 0, f"inpainting.overlap_weight must be >= 0, got {self.overlap_weight}")
        check(self.adv_weight >= 0, f"inpainting.adv_weight must be >= 0, got {self.adv_weight}")
        check(self.adv_weight == 0, "inpainting.adv_weight > 0: the adversarial term is not implemented (the "
                                    "official features are trained with the reconstruction loss only)")
        check(self.random_cells >= 2, f"inpainting.random_cells must be >= 2, got {self.random_cells}")
        check(self.decoder_width > 0, f"inpainting.decoder_width must be > 0, got {self.decoder_width}")
        check(self.decoder_stages >= 1, f"inpainting.decoder_stages must be >= 1, got {self.decoder_stages}")
        check(0 < self.min_scale <= 1, f"inpainting.min_scale must be in (0, 1], got {self.min_scale}")


def overlap_px(size: int, overlap: float) -> int:
    """The ring width in pixels: round(overlap * size), at least 1 when overlap > 0 (128 px: 4, 28 px: 1, 16 px: 1)."""
    return 0 if overlap == 0 else max(1, round(overlap * size))


def center_square(size: int, area: float) -> tuple[int, int]:
    """(top, side) of the centred square covering `area` of a size x size image: side round(sqrt(area) * size),
    top (size - side) // 2 (official, area 1/4: rows fineSize/4 .. 3 fineSize/4 - 1, 0-based)."""
    side = max(1, round(math.sqrt(area) * size))
    return (size - side) // 2, side


def center_region(size: int, area: float, device: torch.device | str = "cpu") -> Tensor:
    """(1, size, size) bool, True on the centred square of `center_square`."""
    top, side = center_square(size, area)
    region = torch.zeros(1, size, size, dtype=torch.bool, device=device)
    region[:, top : top + side, top : top + side] = True
    return region


def random_blobs(n: int, size: int, area: float, cells: int, device: torch.device | str = "cpu") -> Tensor:
    """(N, size, size) bool smooth random blobs, exactly round(area * size^2) pixels per image.

    Uniform noise on a cells x cells grid, bicubically upsampled to the image (official train_random.lua),
    thresholded at each image's own `area` quantile (official: at 0.25, redrawn until 20-30% of the area is
    covered). Drawn from torch's global generator, which the loop checkpoints.
    """
    # One extra cell on each side, cropped away after upsampling: near the image border bicubic interpolation
    # would copy the extreme cell values (blobs would cluster there); the official crops a 10000 px pattern.
    big = round(size * (cells + 2) / cells)
    noise = torch.rand(n, 1, cells + 2, cells + 2, device=device)
    smooth = F.interpolate(noise, size=(big, big), mode="bicubic", align_corners=False)
    off = (big - size) // 2
    smooth = smooth[:, 0, off : off + size, off : off + size].flatten(1)  # (N, S*S)
    k = min(size * size, max(1, round(area * size * size)))
    threshold = smooth.kthvalue(k, dim=1, keepdim=True).values  # (N, 1)
    return (smooth <= threshold).view(n, size, size)


def dilate(mask: Tensor, margin: int) -> Tensor:
    """`mask` (B, H, W) bool grown by `margin` pixels (Chebyshev distance): the pixels within `margin` of it."""
    if margin == 0:
        return mask
    return F.max_pool2d(mask.float().unsqueeze(1), 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0


def erode(region: Tensor, margin: int) -> Tensor:
    """The pixels of `region` (B, H, W) bool farther than `margin` pixels (Chebyshev distance) from any pixel
    outside it; pixels beyond the image border count as region, so the border is not eroded."""
    if margin == 0:
        return region
    outside = (~region).float().unsqueeze(1)  # (B, 1, H, W)
    near_outside = F.max_pool2d(outside, 2 * margin + 1, stride=1, padding=margin)  # pads with -inf
    return region & (near_outside[:, 0] == 0)


def mask_context(x: Tensor, hidden: Tensor) -> Tensor:
    """The encoder's input: `x` (N, C, H, W) with the `hidden` (N or 1, H, W) pixels set to the dataset mean,
    which is 0 after normalisation (official: the ImageNet mean, 117, 104, 123 of 255 in R, G, B)."""
    return x.masked_fill(hidden.unsqueeze(1), 0.0)


def inpainting_loss(pred: Tensor, target: Tensor, region: Tensor, hidden: Tensor, overlap_weight: float) -> Tensor:
    """Squared error on the region, weighted 1 on the hidden pixels and `overlap_weight` on the ring.

    The official code takes the mean over the predicted patch (MSECriterion) and multiplies its gradient by the
    weight matrix, i.e. divides the weighted sum by the element count. Here it is divided by the total weight
    (a weighted mean): the same gradient direction, and Adam, the official optimiser, takes the same steps; but
    with the ring at 10x the official scale grows with the ring's share of the region (23% at 128 px, 44% at
    16 px), and SGD at the shared loop's learning rates diverged on it within 5 steps.

    Args:
        pred: (N, C, H, W) decoder output; target: (N, C, H, W) true pixels, receives no gradient.
        region: (N or 1, H, W) bool, the pixels the loss covers; outside it pred and target do not matter.
        hidden: (N or 1, H, W) bool, the part of the region the encoder did not see (weight 1); the rest of
            the region, the overlap ring, has weight `overlap_weight`.

    Returns:
        sum of w * (pred - target)^2 over pixels and channels, divided by C x the sum of w over pixels.
    """
    region, hidden = region.expand(len(pred), -1, -1), hidden.expand(len(pred), -1, -1)
    w = torch.where(hidden, 1.0, torch.where(region, overlap_weight, 0.0)).unsqueeze(1)  # (N, 1, H, W)
    err = (pred.float() - target.detach().float()).pow(2)  # (N, C, H, W)
    return (w * err).sum() / (w.sum() * pred.shape[1])


def _in_channels(net: nn.Module) -> int:
    """The image channels: the input channels of the backbone's first Conv2d (ConvNet, ResNet, ViT patch embedding)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ConfigError("inpainting reconstructs pixels and reads the image channels from the backbone's first "
                          "Conv2d; this backbone has none: use convnet, resnet18/50 or a ViT")
    return int(conv.in_channels)


class Decoder(nn.Module):
    """Pooled features (N, dim) -> an (N, C, h, w) patch of any size (see the module docstring)."""

    def __init__(self, dim: int, channels: int, width: int, stages: int) -> None:
        super().__init__()
        c0 = width * 2**stages
        self.bottleneck = nn.Sequential(nn.BatchNorm1d(dim), nn.LeakyReLU(0.2))  # official, after netE
        # Biases off: each is followed by BN, and the official code zeroes every conv bias before each step.
        self.fc = nn.Linear(dim, c0 * START * START, bias=False)
        self.fc_bn = nn.BatchNorm2d(c0)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(inplace=True))
            for c in (width * 2 ** (stages - i) for i in range(stages)))
        self.out = nn.Conv2d(width, channels, 3, 1, 1, bias=False)
        for m in self.modules():  # official DCGAN `weights_init`
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, h: Tensor, size: tuple[int, int]) -> Tensor:
        """h: (N, dim); the stages double the side up to `size`: stage i of k ends at ceil(size / 2^(k-1-i)),
        never below the 4x4 start (16 px images, 8 px centre, k = 3: 4, 4, 8; 28 px: 4, 7, 14)."""
        x = F.relu(self.fc_bn(self.fc(self.bottleneck(h)).view(len(h), -1, START, START)))
        k = len(self.stages)
        for i, stage in enumerate(self.stages):
            target = tuple(max(min(START, s), math.ceil(s / 2 ** (k - 1 - i))) for s in size)
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="nearest")
            x = stage(x)
        out: Tensor = self.out(x)
        return out


# Official: Adam (beta1 0.5) at lr 2e-4, x10 for the generator when 0 < wtl2 < 1 (the published command: 0.999),
# batch 64, no weight decay, constant lr, no warm-up. 2e-3 at batch 64 is 8e-3 per 256 (the loop scales linearly).
@register_method("inpainting", config=Config,
                 pretrain=dict(optimizer="adamw", lr=8e-3, weight_decay=0.0, momentum=0.5, warmup_epochs=0))
class ContextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dim: int = backbone.dim  # type: ignore[assignment]
        self.decoder = Decoder(dim, _in_channels(backbone), cfg.decoder_width, cfg.decoder_stages)

    def geometry(self, size: int) -> tuple[int, int, int]:
        """(top, side, ring width) of the window the decoder predicts: the centre square, or the whole image."""
        top, side = center_square(size, self.cfg.mask_area) if self.cfg.region == "center" else (0, size)
        margin = overlap_px(size, self.cfg.overlap)
        check(self.cfg.region == "random" or side > 2 * margin,
              f"inpainting: at {size} px the {side} px centre square has no hidden pixels inside its {margin} px ring; "
              "lower inpainting.overlap or raise inpainting.mask_area")
        return top, side, margin

    def views(self, image_size: int) -> list[ViewSpec]:
        self.geometry(image_size)  # fail early on images too small to mask
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)]

    def masks(self, n: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(region, hidden), each (N or 1, size, size) bool: the pixels predicted and the pixels filled."""
        cfg = self.cfg
        margin = overlap_px(size, cfg.overlap)
        if cfg.region == "center":  # the square is predicted; its interior is hidden
            region = center_region(size, cfg.mask_area, device)
            return region, erode(region, margin)
        hidden = random_blobs(n, size, cfg.mask_area, cfg.random_cells, device)  # the blobs are hidden
        return dilate(hidden, margin), hidden

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: one (N, C, S, S) crop; the encoder sees it with the hidden pixels filled, the decoder predicts
        the window (centre square or whole image) and the loss covers the region within it. No schedule."""
        x = views[0]
        size = x.shape[-1]
        top, side, _ = self.geometry(size)
        region, hidden = self.masks(len(x), size, x.device)
        pred = self.decoder(self.backbone(mask_context(x, hidden)), (side, side))  # (N, C, side, side)
        win = (..., slice(top, top + side), slice(top, top + side))
        return inpainting_loss(pred, x[win], region[win], hidden[win], self.cfg.overlap_weight)

    def encoder(self) -> nn.Module:
        return self.backbone
