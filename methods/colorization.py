"""Colorization: Zhang, Isola, Efros 2016, "Colorful Image Colorization", https://arxiv.org/abs/1603.08511;
official code https://github.com/richzhang/colorization (Caffe: `models/colorization_train_val_v2.prototxt`,
`resources/caffe_traininglayers.py`). Benchmarked as a pretext task in Goyal et al. 2019,
https://arxiv.org/abs/1905.01235 (`fair_self_supervision_benchmark`).

The backbone sees only the lightness of a crop and predicts its colours: the ab plane of CIE Lab is cut into
bins of side 10, the in-gamut ones are the classes, each target pixel is soft-encoded onto its nearest bins
with a Gaussian kernel, and the loss is a per-pixel cross entropy whose pixels are re-weighted by the rarity
of their colour (class rebalancing, with the colour prior estimated from the training set before the first
epoch). Protocols evaluate the backbone.

How the lightness-only network is evaluated on colour images. The benchmark hands protocols the backbone
itself, built for the data's 3 channels, and feeds it normalised RGB. Zhang et al. (table 3, "gray") and
Goyal et al. (`COLORIZATION.COLOR_ON` in every transfer config) evaluate colourisation features on the
lightness channel alone. Both hold here: the backbone is trained on the grey image (its luma
Y' = 0.299 R + 0.587 G + 0.114 B replicated to the 3 channels, then normalised like the data), and the
first Conv2d's weights are kept tied across input channels, w[:, c] = u * alpha_c * std_c (projected before
every step and when the encoder is handed out). A tied first layer computes the same on an RGB image as on
its grey version, so the protocols' RGB inputs give exactly the features of the grey image. The network
sees the luma, a linear stand-in for L, because only a linear function of the RGB channels can be computed
exactly by the first layer.

Where this differs from the official code:
- Head: the official network is a dense FCN whose conv8 predicts the 313 logits at 1/4 of the input
  resolution. Our backbones return pooled (N, dim) features, so a light decoder maps them to a 4x4 grid,
  upsamples to s x s (s = crop side // 4) and classifies every cell. The pooled vector must carry the
  whole colour layout, which is a weaker setting than the dense FCN.
- Classes: the in-gamut bins are those hit by 8-bit sRGB colours (261 with grid 10). The official 313
  bins are ImageNet's hull.
- Soft encoding: the official `NNEncLayer` uses 10 nearest bins and sigma 5; the paper says 5 bins. The
  code is followed. Bins beyond the 5th carry < 1% of the weight.
- Rebalancing: w = ((1 - lambda) p + lambda / Q)^-1, normalised so E_p[w] = 1 (paper eq. 4; the code
  mixes in a uniform over the bins where the prior is non-zero). p is the training set's nearest-bin
  histogram at the target resolution, smoothed with a Gaussian of sigma 5 in ab (paper). The official
  `ClassRebalanceMultLayer` scales only the gradient. Here the weighted loss is the value too, which gives
  the same gradient.
- Targets: the ab map is average-pooled to s x s (official: every 4th pixel). Grey images (every
  |a|, |b| <= 5 at the target resolution) get no loss, as in the official `NonGrayMaskLayer`.
- Optimiser: the official one is Adam (lr 3e-5 at batch 40, betas 0.9/0.99, L2 decay 1e-3, steps). Here it
  is AdamW with the same decay, decoupled, on the shared cosine schedule.

Data without natural colour: `target="channel"` feeds one channel (replicated, tied the same way) and
regresses the other channels (L2), for multi-channel images whose channels are not RGB. Images with one
channel (Fashion-MNIST, MNIST) have nothing to predict and raise `NotApplicable`. The runner records
those cells as skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import first_conv
from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.data.colour import rgb_to_lab
from benchmark.errors import NotApplicable
from benchmark.registry import register_method

LUMA = (0.299, 0.587, 0.114)  # Rec. 601 luma, as torchvision's Grayscale and benchmark.data.augment
AB_EXTENT = 110.0  # the official ab range, [-110, 110]^2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # until before_epoch reads the data's
BASE_GRID = 4  # side of the decoder's first spatial grid


@dataclass(frozen=True)
class Config:
    target: Literal["lab", "channel"] = "lab"  # lab: ab bins from L (the paper); channel: regress the other channels
    input_channel: int = 0  # target="channel": the channel the backbone sees
    grid: float = 10.0  # ab bin side (paper sec. 3.1: grid size 10)
    soft_neighbors: int = 10  # bins each target pixel is spread over (official NNEncLayer: 10; paper: 5)
    soft_sigma: float = 5.0  # Gaussian kernel of the soft encoding, in ab units (paper and code: 5)
    rebalance: bool = True  # class rebalancing by colour rarity (paper eq. 3-4)
    rebalance_lambda: float = 0.5  # weight of the uniform in the mixture (paper: 1/2; official gamma .5)
    prior_sigma: float = 5.0  # Gaussian smoothing of the empirical colour prior, ab units (paper: 5)
    gray_threshold: float = 5.0  # images with every |a|, |b| <= this get no loss (official NonGrayMaskLayer: 5)
    out_stride: int = 4  # targets at crop side // out_stride (official: 1/4 resolution, 56 px of 224)
    decoder_dim: int = 256  # decoder width (official conv8: 256 channels)
    # Official: fixed 176-px crops of 256-px images ((176/256)^2 = 0.47 of the area) plus flip, no jitter.
    # Here: a square crop of 47-100% of the area, resized to the image size.
    min_scale: float = 0.47

    def __post_init__(self) -> None:
        check(self.target in ("lab", "channel"), f"colorization.target must be lab or channel, got {self.target!r}")
        check(self.input_channel >= 0, f"colorization.input_channel must be >= 0, got {self.input_channel}")
        check(0 < self.grid <= AB_EXTENT, f"colorization.grid must be in (0, {AB_EXTENT:g}], got {self.grid}")
        check(self.soft_neighbors >= 1, f"colorization.soft_neighbors must be >= 1, got {self.soft_neighbors}")
        check(self.soft_sigma > 0, f"colorization.soft_sigma must be > 0, got {self.soft_sigma}")
        check(0 <= self.rebalance_lambda <= 1, f"colorization.rebalance_lambda must be in [0, 1], got {self.rebalance_lambda}")
        check(self.prior_sigma > 0, f"colorization.prior_sigma must be > 0, got {self.prior_sigma}")
        check(self.gray_threshold >= 0, f"colorization.gray_threshold must be >= 0, got {self.gray_threshold}")
        check(self.out_stride >= 1, f"colorization.out_stride must be >= 1, got {self.out_stride}")
        check(self.decoder_dim > 0, f"colorization.decoder_dim must be > 0, got {self.decoder_dim}")
        check(0 < self.min_scale <= 1, f"colorization.min_scale must be in (0, 1], got {self.min_scale}")


@functools.lru_cache(maxsize=4)
def _ab_bins(grid: float) -> tuple[tuple[float, float], ...]:
    # Every third 8-bit level (0, 3, ..., 255; 86^3 colours) hits the same bins as all 256^3 at grid 10.
    t = torch.arange(0, 256, 3, dtype=torch.float32) / 255
    rgb = torch.cartesian_prod(t, t, t).T.reshape(1, 3, -1, 1)
    ab = rgb_to_lab(rgb)[0, 1:, :, 0].T  # (P, 2)
    n = round(AB_EXTENT / grid)
    idx = (torch.round(ab / grid).long() + n).clamp(0, 2 * n)
    hit = torch.bincount(idx[:, 0] * (2 * n + 1) + idx[:, 1], minlength=(2 * n + 1) ** 2) > 0
    cells = hit.nonzero().squeeze(1)
    centres = torch.stack([cells // (2 * n + 1), cells % (2 * n + 1)], dim=1).float().sub(n).mul(grid)
    return tuple((float(a), float(b)) for a, b in centres.tolist())


def ab_bins(grid: float = 10.0) -> Tensor:
    """The in-gamut ab bins: centres (multiples of `grid` in [-110, 110]^2) of the cells that contain the ab of
    some 8-bit sRGB colour. (Q, 2), sorted by a then b; Q = 261 at grid 10 (the official hull: 313)."""
    return torch.tensor(_ab_bins(float(grid)))


def soft_encode(ab: Tensor, centres: Tensor, k: int, sigma: float) -> Tensor:
    """Soft-encode ab values onto their k nearest bins with a Gaussian kernel (official `NNEncode`).

    Args:
        ab: (N, 2, H, W) ab values.
        centres: (Q, 2) bin centres.
        k: number of nearest bins that get weight.
        sigma: kernel width, ab units.

    Returns:
        (N, Q, H, W): at each pixel, weights exp(-d^2 / 2 sigma^2) on the k nearest bins, normalised to sum 1.
    """
    n, _, h, w = ab.shape
    pts = ab.float().permute(0, 2, 3, 1).reshape(-1, 2)  # (P, 2)
    d2 = torch.cdist(pts, centres.float()).square()  # (P, Q)
    near, idx = d2.topk(min(k, len(centres)), dim=1, largest=False)
    wts = torch.softmax(-near / (2 * sigma**2), dim=1)  # = Gaussian weights normalised, without underflow
    z = torch.zeros_like(d2).scatter_(1, idx, wts)
    return z.view(n, h, w, -1).permute(0, 3, 1, 2)


def rebalance_weights(prior: Tensor, lam: float) -> Tensor:
    """Class weights w = ((1 - lam) p + lam / Q)^-1, scaled so that sum_q p_q w_q = 1 (paper eq. 4).

    Args:
        prior: (Q,) colour distribution (sums to 1).
        lam: weight of the uniform distribution; 1 gives w = 1 everywhere.
    """
    w = 1 / ((1 - lam) * prior + lam / len(prior))
    return w / (prior * w).sum()


def smooth_prior(counts: Tensor, centres: Tensor, sigma: float) -> Tensor:
    """The empirical distribution of `counts` (Q,) over the bins, convolved with a Gaussian of `sigma` ab units."""
    kernel = torch.exp(-torch.cdist(centres.float(), centres.float()).square() / (2 * sigma**2))  # (Q, Q)
    p = kernel @ (counts.float() / counts.sum().clamp_min(1))
    return p / p.sum()


def colorization_loss(logits: Tensor, z: Tensor, weights: Tensor) -> Tensor:
    """Rebalanced multinomial cross entropy (paper eq. 2), averaged over all pixels of the batch.

    L = 1/(N H W) sum_{n,h,w} v_{nhw} * (-sum_q z_{nqhw} log softmax_q(logits)_{nqhw})

    Args:
        logits: (N, Q, H, W) predicted scores over the ab bins.
        z: (N, Q, H, W) soft-encoded targets (each pixel sums to 1).
        weights: (N, H, W) per-pixel weights v (class rebalancing times the non-grey mask).
    """
    ce = -(z * F.log_softmax(logits.float(), dim=1)).sum(dim=1)  # (N, H, W)
    return (weights * ce).mean()


@torch.no_grad()
def tie_channels(weight: Tensor, k: Tensor) -> None:
    """Project a conv weight (O, C, kh, kw) in place onto {w[:, c] = u * k_c} (least squares over c).

    With k_c = alpha_c * std_c, the layer's output on a normalised image depends on the image only through
    sum_c alpha_c * pixel_c: the layer is blind to everything else (colour).
    """
    kv = k.to(weight).view(1, -1, 1, 1)
    u = (weight * kv).sum(1, keepdim=True) / kv.square().sum()
    weight.copy_(u * kv)


class ColourDecoder(nn.Module):
    """Pooled features (N, dim) -> (N, out, s, s): a Linear onto a 4x4 grid of `width` channels, bilinear
    upsampling to s x s, a 3x3 conv-BN-ReLU, and a 1x1 conv per cell (the official `conv8_313`)."""

    def __init__(self, dim: int, width: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, width * BASE_GRID**2, bias=False), nn.BatchNorm1d(width * BASE_GRID**2),
                                nn.ReLU(inplace=True))
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, out, 1)

    def forward(self, h: Tensor, size: int) -> Tensor:
        x = self.fc(h).view(len(h), -1, BASE_GRID, BASE_GRID)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out: Tensor = self.classifier(self.conv(x))
        return out


# Official: Adam, lr 3e-5 at batch 40 (1.9e-4 per 256 images, linearly scaled), L2 weight decay 1e-3, no warm-up.
@register_method("colorization", config=Config, pretrain=dict(optimizer="adamw", lr=2e-4, weight_decay=1e-3, warmup_epochs=0))
class Colorization(nn.Module):
    mean: Tensor
    std: Tensor
    alpha: Tensor
    prior: Tensor
    bins: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.conv_name, conv = first_conv(backbone, "colorization ties the backbone's first Conv2d across input channels")
        c = int(conv.in_channels)
        if c == 1:
            raise NotApplicable("colorization needs colour (3-channel) images; the dataset has 1 channel (grey-scale), "
                                "so there is no colour to predict from lightness")
        if cfg.target == "lab":
            if c != 3:
                raise NotApplicable(f"colorization target=lab needs RGB images; the dataset has {c} channels "
                                    "(use colorization.target=channel)")
            alpha = torch.tensor(LUMA)
        else:
            check(cfg.input_channel < c, f"colorization.input_channel must be < {c} (the data's channels), got {cfg.input_channel}")
            alpha = F.one_hot(torch.tensor(cfg.input_channel), c).float()
        self.register_buffer("alpha", alpha, persistent=False)  # (C,) how the grey input is made from the channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN if c == 3 else (0.5,) * c))  # the data's, from before_epoch
        self.register_buffer("std", torch.tensor(IMAGENET_STD if c == 3 else (0.25,) * c))
        self.register_buffer("bins", ab_bins(cfg.grid), persistent=False)  # (Q, 2)
        q = len(self.bins)
        self.register_buffer("prior", torch.full((q,), 1 / q))  # colour prior; uniform (all weights 1) until estimated
        out = q if cfg.target == "lab" else c - 1
        self.decoder = ColourDecoder(int(getattr(backbone, "dim")), cfg.decoder_dim, out)
        self.tie()

    def views(self, image_size: int) -> list[ViewSpec]:
        # One crop: square, flipped, no colour jitter (the colours are the targets).
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)]

    def tie(self) -> None:
        """Keep the first conv blind to colour: tied across channels in proportion to alpha_c * std_c."""
        conv = self.backbone.get_submodule(self.conv_name)
        tie_channels(conv.weight, self.alpha * self.std)  # type: ignore[arg-type]

    def grey(self, x: Tensor) -> Tensor:
        """Normalised images (N, C, H, W) -> their grey version, sum_c alpha_c * pixel_c in every channel, normalised."""
        raw = x.float() * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)
        y = (raw * self.alpha.view(1, -1, 1, 1)).sum(1, keepdim=True)  # (N, 1, H, W)
        return ((y - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)).to(x.dtype)

    def targets(self, x: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Soft-encoded colour targets (N, Q, s, s) and per-pixel weights (N, s, s) of normalised RGB images."""
        raw = x.float() * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)
        ab = F.adaptive_avg_pool2d(rgb_to_lab(raw)[:, 1:], size)  # (N, 2, s, s)
        z = soft_encode(ab, self.bins, self.cfg.soft_neighbors, self.cfg.soft_sigma)
        w = torch.ones_like(ab[:, 0])
        if self.cfg.rebalance:
            w = rebalance_weights(self.prior, self.cfg.rebalance_lambda)[z.argmax(1)]  # weight of the nearest bin
        coloured = (ab.abs() > self.cfg.gray_threshold).flatten(1).any(1)  # (N,)
        return z, w * coloured.view(-1, 1, 1)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: one normalised (N, C, S, S) crop; no schedule."""
        self.tie()  # re-project after the last optimiser step (Adam's per-weight steps leave the tied set)
        x = views[0]
        size = max(1, x.shape[-1] // self.cfg.out_stride)
        pred = self.decoder(self.backbone(self.grey(x)), size)  # (N, Q or C-1, s, s)
        if self.cfg.target == "channel":
            keep = [i for i in range(x.shape[1]) if i != self.cfg.input_channel]
            return F.mse_loss(pred.float(), F.adaptive_avg_pool2d(x[:, keep].float(), size))
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            z, w = self.targets(x, size)
        return colorization_loss(pred, z, w)

    @torch.no_grad()
    def before_epoch(self, epoch: int, splits: Any, device: torch.device, seed: int) -> None:
        """Read the data's normalisation; at the first epoch, estimate the colour prior over the training set."""
        self.mean.copy_(torch.tensor(splits.mean))
        self.std.copy_(torch.tensor(splits.std))
        self.tie()
        if epoch == 0 and self.cfg.target == "lab" and self.cfg.rebalance:
            size = max(1, splits.image_size // self.cfg.out_stride)
            counts = torch.zeros(len(self.bins), device=device)
            for xb in splits.train.batches(512):  # in memory or streamed alike
                rgb = xb.to(device).float() / 255
                ab = F.adaptive_avg_pool2d(rgb_to_lab(rgb)[:, 1:], size).permute(0, 2, 3, 1).reshape(-1, 2)
                nearest = torch.cdist(ab, self.bins.to(device)).argmin(1)
                counts += torch.bincount(nearest, minlength=len(self.bins)).float()
            self.prior.copy_(smooth_prior(counts, self.bins.to(device), self.cfg.prior_sigma))

    def encoder(self) -> nn.Module:
        self.tie()  # the handed-out backbone is exactly colour-blind, whatever the optimiser's last step did
        return self.backbone
