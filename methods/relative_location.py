"""Context prediction (relative patch location): Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation
Learning by Context Prediction", https://arxiv.org/abs/1505.05192; official code https://github.com/cdoersch/deepcontext
(Caffe: `train.py`).

A 3x3 grid of square patches is cut from every image, with gaps between the patches and a random jitter of each
patch's position, so that the network cannot solve the task from low-level cues (edges continuing across patch
borders, textures lining up). The SAME backbone encodes every patch (a Siamese tower ending in a per-patch fc6);
the fc6 vectors of a patch and one of its 8 neighbours are concatenated, and an MLP (fc7, fc8, fc9) predicts
where the second patch lies relative to the first: 8-way cross entropy. Protocols evaluate the backbone on
whole images.

Where the official code differs from the paper, the code is followed:
- pairs: the paper samples one patch and one of its 8 neighbours; the code samples a whole grid of patches,
  encodes each once, and trains on EVERY ordered pair of 8-adjacent patches (`pairs="all"`: 40 pairs from the 9
  patches here). `pairs="one"` is the paper's sampling (the centre patch and one random neighbour).
- chromatic aberration: the paper describes projecting out the green-magenta axis and dropping colour
  channels; the code drops 2 of the 3 channels of every patch at random (`chroma="drop"`) and then
  normalises every patch to zero mean and unit root-mean-square (`patch_norm="mean_rms"`). The dropped
  channels get Gaussian noise of 1/100 of the kept channel's standard deviation, as the paper says (the code's
  uniform noise of +-0.5 grey levels is in raw 0-255 units, which normalised inputs do not have).
- the loss is summed over pairs in the code (`normalization: NONE`, lr 1e-5) and averaged here (the lr absorbs it).
Sizes: the official 96 px patches, 48 px gaps and 7 px jitter are kept as ratios of the patch side, and the
patch is the largest whose 3x3 grid fits in the image (`patch_geometry`: 6 px at 28 px, 3 px at 16 px).
Not reproduced: the official random downsampling of a third of the patches to as few as 100 pixels (larger
than the whole patch at these sizes); the official fixed lr, no momentum and no weight decay (the shared loop's
SGD and cosine schedule are used). The heads follow the official fc6-fc9 (BatchNorm in fc6 and fc7, none in
fc8) on top of the shared backbone in place of the official CaffeNet conv tower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method

GRID = 3  # patches per side: one patch and its 8 neighbours
# (row, column) offset of the second patch from the first; label k = NEIGHBOURS[k], in reading order
# (the official `pos2lbl`: 0 1 2 / 3 _ 4 / 5 6 7).
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class Config:
    pairs: Literal["all", "one"] = "all"  # every ordered adjacent pair of the grid (official code) or one (paper)
    gap_ratio: float = 0.5  # gap between patches / patch side (official 48 / 96)
    jitter_ratio: float = 7 / 96  # max jitter / patch side (official `noise = 7` for 96 px); >= 1 px when > 0
    patch_norm: Literal["none", "mean", "mean_rms"] = "mean_rms"  # per patch (official: mean, then / RMS)
    chroma: Literal["drop", "projection", "none"] = "drop"  # RGB only (official code: drop; paper: both)
    drop_noise: float = 0.01  # std of the noise in dropped channels / std of the kept one (paper: ~1/100)
    patch_dim: int = 4096  # fc6, the per-patch layer of the shared tower (official: 4096)
    hidden_dim: int = 4096  # fc7 and fc8 on the concatenated pair (official: 4096)
    # Official: the whole image rescaled to 150k-450k pixels, a grid at a random offset, no flip. Here: a square
    # crop of 75-100% of the area, resized, plus flip, and the grid at a random offset in what is left over.
    min_scale: float = 0.75

    def __post_init__(self) -> None:
        check(self.pairs in ("all", "one"), f"relative_location.pairs must be all or one, got {self.pairs!r}")
        check(0 <= self.gap_ratio <= 4, f"relative_location.gap_ratio must be in [0, 4], got {self.gap_ratio}")
        check(0 <= self.jitter_ratio <= 1, f"relative_location.jitter_ratio must be in [0, 1], got {self.jitter_ratio}")
        check(self.patch_norm in ("none", "mean", "mean_rms"),
              f"relative_location.patch_norm must be none, mean or mean_rms, got {self.patch_norm!r}")
        check(self.chroma in ("drop", "projection", "none"),
              f"relative_location.chroma must be drop, projection or none, got {self.chroma!r}")
        check(self.drop_noise >= 0, f"relative_location.drop_noise must be >= 0, got {self.drop_noise}")
        check(self.patch_dim > 0, f"relative_location.patch_dim must be > 0, got {self.patch_dim}")
        check(self.hidden_dim > 0, f"relative_location.hidden_dim must be > 0, got {self.hidden_dim}")
        check(0 < self.min_scale <= 1, f"relative_location.min_scale must be in (0, 1], got {self.min_scale}")


def _round(v: float) -> int:
    return int(v + 0.5)  # half up, as the docs' examples assume (Python's round() goes half to even)


@functools.lru_cache(maxsize=32)
def patch_geometry(image_size: int, gap_ratio: float, jitter_ratio: float) -> tuple[int, int, int]:
    """(patch, gap, jitter) in pixels: the largest patch p whose 3x3 grid with gaps g = round(gap_ratio p) and
    jitter j fits, 3 p + 2 g + 2 j <= image_size. j = round(jitter_ratio p), at least 1 px when jitter_ratio > 0
    (it would round to none on small images), at most g // 2 so that jittered patches never overlap
    (official: 7 <= 48 / 2). 28 px: (6, 3, 1); 16 px: (3, 2, 1); 398 px: the official (96, 48, 7)."""
    for p in range(image_size // GRID, 0, -1):
        g = _round(gap_ratio * p)
        j = min(max(1, _round(jitter_ratio * p)), g // 2) if jitter_ratio > 0 else 0
        if GRID * p + (GRID - 1) * g + 2 * j <= image_size:
            return p, g, j
    check(False, f"relative_location: {image_size} px images cannot hold a 3x3 grid of patches; lower gap_ratio")
    raise AssertionError  # unreachable: check raised


def patch_starts(n: int, image_size: int, patch: int, gap: int, jitter: int, device: torch.device) -> Tensor:
    """Random top-left corners of the 3x3 grid's patches, from torch's global generator.

    The grid sits at a random offset u in [0, margin] per image and axis (margin: the pixels the grid, gaps and
    jitter leave over); patch (r, c) starts at u + jitter + (r, c) (patch + gap), moved by its own jitter in
    [-jitter, jitter] per axis (official `random.randint(-noise, noise)`), so every patch stays inside the image.

    Returns:
        (n, 9, 2) long (row, column), cells numbered row-major (cell r * 3 + c).
    """
    margin = image_size - (GRID * patch + (GRID - 1) * gap + 2 * jitter)
    origin = torch.randint(margin + 1, (n, 1, 2), device=device) + jitter
    cell = torch.arange(GRID * GRID, device=device)
    grid = torch.stack([cell // GRID, cell % GRID], dim=-1) * (patch + gap)  # (9, 2)
    return origin + grid + torch.randint(-jitter, jitter + 1, (n, GRID * GRID, 2), device=device)


def extract_patches(x: Tensor, starts: Tensor, patch: int) -> Tensor:
    """Cut square patches: x (N, C, S, S), starts (N, P, 2) long (row, column) -> (N, P, C, patch, patch),
    out[n, k] = x[n, :, r:r + patch, c:c + patch] with (r, c) = starts[n, k]."""
    span = torch.arange(patch, device=x.device)
    rows = (starts[..., 0, None] + span)[..., :, None]  # (N, P, patch, 1)
    cols = (starts[..., 1, None] + span)[..., None, :]  # (N, P, 1, patch)
    n = torch.arange(len(x), device=x.device).view(-1, 1, 1, 1)
    return x.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 1, 4, 2, 3)  # (N, P, p, p, C) -> (N, P, C, p, p)


@functools.lru_cache(maxsize=1)
def neighbour_pairs() -> tuple[Tensor, Tensor, Tensor]:
    """Every ordered pair of 8-adjacent cells of the 3x3 grid: (first, second, label), each (40,) long, where
    cell `second` lies at NEIGHBOURS[label] from cell `first` (sorted by first, then label). Cached: read only."""
    rows = []
    for a in range(GRID * GRID):
        for k, (dr, dc) in enumerate(NEIGHBOURS):
            r, c = a // GRID + dr, a % GRID + dc
            if 0 <= r < GRID and 0 <= c < GRID:
                rows.append((a, r * GRID + c, k))
    first, second, label = torch.tensor(rows).T
    return first, second, label


def gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """t (N, P, D), index (N, Q) long -> (N, Q, D), out[n, q] = t[n, index[n, q]]."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def drop_colour(patches: Tensor, keep: Tensor, noise: Tensor, scale: float) -> Tensor:
    """Colour dropping (official code): every channel but `keep` is replaced by noise with a standard
    deviation of `scale` times the kept channel's, so that chromatic aberration cannot reveal the position.

    Args:
        patches: (M, C, p, p); keep: (M,) long channel index; noise: (M, C, p, p) standard normal.
    """
    kept = patches.gather(1, keep.view(-1, 1, 1, 1).expand(-1, 1, *patches.shape[2:]))  # (M, 1, p, p)
    std = kept.std(dim=(1, 2, 3), unbiased=False, keepdim=True)
    is_kept = F.one_hot(keep, patches.shape[1]).to(torch.bool).view(*patches.shape[:2], 1, 1)
    return torch.where(is_kept, patches, noise * scale * std)


def project_colour(patches: Tensor) -> Tensor:
    """Projection (paper): remove the green-magenta axis a = (-1, 2, -1) from every pixel, x - a (a.x) / (a.a),
    along which chromatic aberration shifts colour. patches: (..., 3, p, p), in normalised units (the
    per-channel stds of RGB datasets are close, so this is close to projecting raw colours)."""
    a = torch.tensor([-1.0, 2.0, -1.0], device=patches.device, dtype=patches.dtype)
    b = torch.eye(3, device=patches.device, dtype=patches.dtype) - torch.outer(a, a) / a.dot(a)  # (3, 3)
    return torch.einsum("ij,...jhw->...ihw", b, patches)


def normalize_patches(patches: Tensor, mode: str, eps: float = 1e-5) -> Tensor:
    """Per patch: remove each channel's mean (`mean`), then divide by the root mean square over all channels
    and pixels (`mean_rms`, official `im / sqrt(mean(im^2))`: contrast is no cue), or leave (`none`).
    patches: (..., C, p, p)."""
    if mode == "none":
        return patches
    centred = patches - patches.mean(dim=(-2, -1), keepdim=True)
    if mode == "mean":
        return centred
    return centred / torch.sqrt(centred.square().mean(dim=(-3, -2, -1), keepdim=True) + eps)


def relative_location_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross entropy over the 8 relative positions, averaged over pairs.

    Args:
        logits: (M, 8) scores of the second patch's position relative to the first (NEIGHBOURS order).
        target: (M,) long labels in [0, 8).
    """
    return F.cross_entropy(logits.float(), target)


# The official recipe (CaffeNet with BatchNorm, summed loss, fixed lr 1e-5, no momentum, no weight decay)
# does not carry over to a mean loss; here the SGD settings of the other BatchNorm pretext tasks (RotNet,
# Jigsaw in VISSL), with the official weight decay of 0.
@register_method("relative_location", config=Config, pretrain=dict(optimizer="sgd", lr=0.1, weight_decay=0.0, warmup_epochs=0))
class RelativeLocation(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dim: int = backbone.dim  # type: ignore[assignment]
        self.patch_fc = nn.Sequential(nn.Linear(dim, cfg.patch_dim, bias=False), nn.BatchNorm1d(cfg.patch_dim), nn.ReLU(inplace=True))
        h = cfg.hidden_dim
        self.head = nn.Sequential(  # official fc7 (BatchNorm), fc8 (none), fc9
            nn.Linear(2 * cfg.patch_dim, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, h), nn.ReLU(inplace=True),
            nn.Linear(h, len(NEIGHBOURS)),
        )

    def views(self, image_size: int) -> list[ViewSpec]:
        patch_geometry(image_size, self.cfg.gap_ratio, self.cfg.jitter_ratio)  # fail early on images too small
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)]

    def sample(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The patches to encode and the pairs to classify, drawn from torch's global generator (checkpointed by
        the loop, so a resumed run draws the same).

        Returns:
            patches (N, P, C, p, p), prepared (colour, normalisation); first and second (N, Q) long indices into
            the P patches of each image; target (N, Q) long labels. `all`: P = 9, Q = 40; `one`: P = 2, Q = 1.
        """
        cfg, n, dev = self.cfg, len(x), x.device
        p, g, j = patch_geometry(x.shape[-1], cfg.gap_ratio, cfg.jitter_ratio)
        starts = patch_starts(n, x.shape[-1], p, g, j, dev)  # (N, 9, 2)
        if cfg.pairs == "all":
            first, second, target = (t.to(dev).expand(n, -1) for t in neighbour_pairs())
        else:  # the centre patch and one of its neighbours, each encoded: patch 0 is the centre, 1 the neighbour
            target = torch.randint(len(NEIGHBOURS), (n, 1), device=dev)
            offset = torch.tensor(NEIGHBOURS, device=dev)[target]  # (N, 1, 2)
            centre = GRID * GRID // 2
            cells = torch.cat([torch.full_like(target, centre), centre + offset[..., 0] * GRID + offset[..., 1]], 1)  # (N, 2)
            starts = gather_rows(starts, cells)
            first, second = torch.zeros_like(target), torch.ones_like(target)
        return self.prepare(extract_patches(x, starts, p)), first, second, target

    def prepare(self, patches: Tensor) -> Tensor:
        """Chromatic-aberration counter-measure (3 channels only), then per-patch normalisation."""
        if patches.shape[2] == 3 and self.cfg.chroma == "drop":
            flat = patches.flatten(0, 1)
            keep = torch.randint(3, (len(flat),), device=patches.device)
            patches = drop_colour(flat, keep, torch.randn_like(flat), self.cfg.drop_noise).view_as(patches)
        elif patches.shape[2] == 3 and self.cfg.chroma == "projection":
            patches = project_colour(patches)
        return normalize_patches(patches, self.cfg.patch_norm)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: one (N, C, S, S) crop; all patches go through the backbone in one batch (shared BN statistics)."""
        patches, first, second, target = self.sample(views[0])
        n, k = patches.shape[:2]
        h = self.patch_fc(self.backbone(patches.flatten(0, 1))).view(n, k, -1)  # (N, P, patch_dim)
        pair = torch.cat([gather_rows(h, first), gather_rows(h, second)], -1)  # (N, Q, 2 patch_dim), first then second
        return relative_location_loss(self.head(pair.flatten(0, 1)), target.flatten())

    def encoder(self) -> nn.Module:
        return self.backbone
